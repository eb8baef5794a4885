"""The streaming stitcher must give exactly diffusers' whole-tensor soft append, while holding only the edge."""

import pytest
import torch
from diffusers import HunyuanVideoFramepackPipeline

from framepack_local.engine import schedule as s
from framepack_local.engine.stitch import Stitcher


def reference_soft_append(history_thwc, current_thwc, overlap):
    # diffusers' implementation works on (B, C, T, H, W); it does not use `self`.
    to_b = lambda t: t.permute(3, 0, 1, 2)[None]  # noqa: E731
    out = HunyuanVideoFramepackPipeline._soft_append(None, to_b(history_thwc), to_b(current_thwc), overlap)
    return out[0].permute(1, 2, 3, 0)


def decode_lengths(n, w, mode):
    """Frames the VAE returns per section: T latents -> 4(T-1)+1 frames."""
    frames = lambda t: 4 * (t - 1) + 1  # noqa: E731
    if n == 1:
        return [frames(w + 1)]
    if mode == "inverted":
        return [frames(w)] + [frames(2 * w)] * (n - 2) + [frames(2 * w + 1)]
    return [frames(w + 1)] + [frames(2 * w)] * (n - 1)


@pytest.mark.parametrize("mode", ["inverted", "forward"])
@pytest.mark.parametrize("n,w", [(1, 3), (2, 1), (2, 3), (5, 2), (6, 9)])
def test_stitcher_matches_reference(mode, n, w):
    gen = torch.Generator().manual_seed(n * 100 + w)
    decodes = [torch.rand(t, 4, 5, 3, generator=gen) for t in decode_lengths(n, w, mode)]
    overlap = s.overlap_frames(w)
    prepend = mode == "inverted"

    chunks = []
    stitcher = Stitcher(overlap, prepend=prepend, sink=chunks.append)
    max_pending = 0
    reference = None
    for dec in decodes:
        stitcher.add(dec)
        max_pending = max(max_pending, stitcher.pending.shape[0])
        if reference is None:
            reference = dec
        elif prepend:
            reference = reference_soft_append(dec, reference, overlap)
        else:
            reference = reference_soft_append(reference, dec, overlap)
        assert stitcher.frames == reference.shape[0]
    stitcher.finish()
    ordered = chunks[::-1] if prepend else chunks
    video = torch.cat(ordered)
    assert video.shape[0] == s.total_frames(n, w) == reference.shape[0]
    torch.testing.assert_close(video, reference)
    assert max_pending <= overlap  # only the still-changing edge is held in memory
    assert stitcher.pending is None
