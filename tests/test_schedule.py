import math

import pytest

from framepack_local.engine import schedule as s


@pytest.mark.parametrize("seconds,window,expected", [
    (5, 9, 4), (120, 9, 100), (1, 9, 1), (0.1, 9, 1), (2.5, 9, 2), (60, 33, 14), (10, 1, 75),
])
def test_section_count(seconds, window, expected):
    assert s.section_count(seconds, window) == expected


def test_paddings_small_and_large():
    assert s.latent_paddings(1) == [0]
    assert s.latent_paddings(4) == [3, 2, 1, 0]
    assert s.latent_paddings(5) == [3, 2, 2, 1, 0]
    assert s.latent_paddings(8) == [3, 2, 2, 2, 2, 2, 1, 0]
    for n in range(1, 61):
        pads = s.latent_paddings(n)
        assert len(pads) == n and pads[-1] == 0
        assert all(a >= b for a, b in zip(pads, pads[1:]))
        if n > 4:
            assert pads[0] == 3 and pads[-2] == 1 and set(pads[1:-2]) == {2}


@pytest.mark.parametrize("window", range(1, 34))
@pytest.mark.parametrize("end", [False, True])
def test_inverted_layouts(window, end):
    for n in range(1, 61):
        layouts = s.section_layouts(n, window, "inverted", has_end_image=end)
        assert len(layouts) == n
        for k, lay in enumerate(layouts):
            pad = s.latent_paddings(n)[k] * window
            assert lay.padding == pad
            win_start = 1 + pad
            assert lay.indices_latents == tuple(range(win_start, win_start + window))
            after = win_start + window
            # start image at 0, the 1x frame right after the window, then 2x and 4x further in the future
            assert lay.indices_clean == (0, after)
            assert lay.indices_2x == (after + 1, after + 2)
            assert lay.indices_4x == tuple(range(after + 3, after + 19))
            assert lay.use_end_image == (end and k == 0)
            assert lay.is_first == (k == 0) and lay.is_last == (k == n - 1)
        # the last section sits right next to the start image
        assert layouts[-1].indices_latents[0] == 1


@pytest.mark.parametrize("window", range(1, 34))
def test_forward_layouts(window):
    for n in (1, 2, 7, 60):
        for lay in s.section_layouts(n, window, "forward"):
            assert lay.indices_clean == (0, 19)
            assert lay.indices_4x == tuple(range(1, 17))
            assert lay.indices_2x == (17, 18)
            assert lay.indices_latents == tuple(range(20, 20 + window))
            assert lay.padding == 0 and not lay.use_end_image


def test_forward_rejects_end_image_and_unknown_mode():
    with pytest.raises(ValueError):
        s.section_layouts(3, 9, "forward", has_end_image=True)
    with pytest.raises(ValueError):
        s.section_layouts(3, 9, "sideways")


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_frames_add_up(mode):
    for window in range(1, 34):
        for n in range(1, 61):
            per = s.decoded_frames_per_section(n, window, mode)
            assert len(per) == n and sum(per) == s.total_frames(n, window) == 4 * n * window + 1


def test_buckets():
    assert s.find_bucket(480, 832) == (480, 832)
    assert s.find_bucket(1080, 1920) == (480, 832)  # 16:9 (0.5625) -> 480/832 (0.577) beats 448/864 (0.519)
    assert s.find_bucket(4000, 1000) == (960, 416)
    for h, w in [(100, 100), (3000, 2000), (17, 900)]:
        bh, bw = s.find_bucket(h, w, 640)
        assert (bh, bw) in s.BUCKETS_640
        sh, sw = s.find_bucket(h, w, 128)
        assert sh % 16 == 0 and sw % 16 == 0 and sh >= 16 and sw >= 16
        # the scaled bucket keeps the orientation of the 640 one
        assert (sh >= sw) == (bh >= bw) or sh == sw


def test_flow_sigmas_shift():
    sig = s.flow_sigmas(25, s.window_tokens(9, 640, 608))
    assert len(sig) == 26 and sig[0] == 1.0 and sig[-1] == 0.0
    assert all(a > b for a, b in zip(sig, sig[1:]))
    # shift pushes the schedule towards high noise: the midpoint sigma is above 0.5
    assert sig[len(sig) // 2] > 0.5
    assert s.flux_mu(256) == pytest.approx(0.5)
    assert s.flux_mu(4096) == pytest.approx(1.15)
    assert s.flux_mu(10**6) == pytest.approx(math.log(7.0))
    # the flux shift multiplies the odds sigma/(1-sigma) by e^mu at every step
    plain = [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = s.flow_sigmas(4, 256)
    for a, b in zip(plain[1:-1], shifted[1:-1]):
        assert (b / (1 - b)) / (a / (1 - a)) == pytest.approx(math.exp(0.5))


def test_overlap():
    assert s.overlap_frames(9) == 33
    assert s.overlap_frames(1) == 1
