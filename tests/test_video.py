"""Tests for framepack_local.jobs.video (and the atomic writers in framepack_local.files): segment-once previews, stream-copy publishing, probing, errors."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from framepack_local import files
from framepack_local.jobs import video
from framepack_local.errors import InputError, OutputFolderError
from framepack_local.jobs.video import SegmentedVideo, encode_frames, probe_video, read_frames

H, W = 48, 64

RED = (220, 30, 30)
GREEN = (30, 200, 40)
BLUE = (40, 50, 220)
YELLOW = (230, 220, 40)
GRAY = (128, 128, 128)
MAGENTA = (210, 40, 200)


def solid(color, n: int) -> np.ndarray:
    frames = np.empty((n, H, W, 3), np.uint8)
    frames[:] = np.asarray(color, np.uint8)
    return frames


def frame_colors(path) -> np.ndarray:
    """Mean RGB of every decoded frame, shape (T, 3)."""
    return read_frames(path).reshape(-1, H * W, 3).mean(axis=1)


def assert_color_runs(path, runs) -> None:
    """runs: [(color, n), ...] in time order; H.264 is lossy, so compare colours approximately."""
    got = frame_colors(path)
    expected = np.concatenate([np.tile(np.asarray(c, float), (n, 1)) for c, n in runs])
    assert got.shape == expected.shape, f"{got.shape[0]} frames decoded, expected {expected.shape[0]}"
    worst = np.abs(got - expected).max(axis=1)
    bad = np.nonzero(worst > 12)[0]
    assert bad.size == 0, f"frame {bad[0]} has colour {got[bad[0]].round()} instead of {expected[bad[0]]}"


def leftovers(folder: Path) -> list[str]:
    """Temp files our atomic writers may leave behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(files.TMP_SUFFIX))


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and re.search(r"[.!?]\s+[A-Z]", msg) is None


def file_ids(paths) -> dict:
    out = {}
    for p in paths:
        st = os.stat(p)
        out[Path(p).name] = (st.st_ino, st.st_mtime_ns, st.st_size, Path(p).read_bytes())
    return out


# --------------------------------------------------------------------------- encode + probe


def test_encode_frames_and_probe(tmp_path):
    frames = np.zeros((7, H, W, 3), np.uint8)
    frames[..., 0] = np.arange(7, dtype=np.uint8)[:, None, None] * 30  # red ramps up over time
    out = tmp_path / "clip.mp4"
    encode_frames(out, frames, fps=30, crf=16)

    info = probe_video(out)
    assert (info.frames, info.width, info.height) == (7, W, H)
    assert info.fps == pytest.approx(30.0)
    assert info.duration_s == pytest.approx(7 / 30, abs=0.02)
    assert info.codec == "h264"
    assert info.comment is None
    # Tagged BT.709 (matrix, primaries, transfer), limited range, 4:2:0: what browsers expect.
    _, header, _ = video._run_ffmpeg(["-i", str(out)])
    assert "yuv420p(tv, bt709, progressive)" in header

    decoded = read_frames(out)
    assert decoded.shape == (7, H, W, 3)
    assert np.abs(decoded[..., 0].mean(axis=(1, 2)) - np.arange(7) * 30).max() < 8
    assert leftovers(tmp_path) == []


def test_encode_frames_accepts_a_generator(tmp_path):
    def gen():
        for i in range(5):
            yield solid(RED if i < 3 else BLUE, 1)[0]  # single HWC frames

    out = tmp_path / "streamed.mp4"
    encode_frames(out, gen())
    assert probe_video(out).frames == 5
    assert_color_runs(out, [(RED, 3), (BLUE, 2)])


@pytest.mark.parametrize("shape", [(3, 47, 64, 3), (3, 48, 63, 3)])
def test_odd_sizes_are_refused_clearly(tmp_path, shape):
    with pytest.raises(InputError, match="must be even"):
        encode_frames(tmp_path / "odd.mp4", np.zeros(shape, np.uint8))
    sv = SegmentedVideo(tmp_path / "work", prepend=False)
    with pytest.raises(InputError, match="must be even"):
        sv.add_finished(np.zeros(shape, np.uint8))
    assert not (tmp_path / "odd.mp4").exists()


def test_wrong_dtype_or_layout_is_refused(tmp_path):
    with pytest.raises(InputError):
        encode_frames(tmp_path / "x.mp4", np.zeros((2, H, W, 3), np.float32))
    with pytest.raises(InputError):
        encode_frames(tmp_path / "x.mp4", np.zeros((2, 3, H, W), np.uint8))


# --------------------------------------------------------------------------- segmented video


def test_prepend_order_count_and_metadata(tmp_path):
    sv = SegmentedVideo(tmp_path / "work", fps=30, crf=16, prepend=True)
    sv.add_finished(solid(RED, 5))  # A: the end of the video, generated first
    sv.add_finished(solid(GREEN, 4))  # B: comes before A
    sv.set_pending(solid(BLUE, 3))  # P: at the growing (front) edge
    assert sv.frame_count == 12

    # Long (ffmpeg -i cuts printed tags at 255 chars) and full of ffmetadata's special characters.
    meta = {"seed": 31337, "prompt": "a cat, «quoted» \"text\" a=b; #c \\ d\nline two " * 20, "sections": 2}
    out = sv.publish(tmp_path / "preview.mp4", metadata=meta)
    assert out == tmp_path / "preview.mp4"
    assert_color_runs(out, [(BLUE, 3), (GREEN, 4), (RED, 5)])

    info = probe_video(out)
    assert (info.frames, info.width, info.height, info.codec) == (12, W, H, "h264")
    assert info.fps == pytest.approx(30.0)
    assert info.duration_s == pytest.approx(12 / 30, abs=0.02)
    assert json.loads(info.comment) == meta


def test_append_order(tmp_path):
    sv = SegmentedVideo(tmp_path / "work", prepend=False)
    sv.add_finished(solid(RED, 5))
    sv.add_finished(solid(GREEN, 4))
    sv.set_pending(solid(BLUE, 3))
    out = sv.publish(tmp_path / "preview.mp4")
    assert_color_runs(out, [(RED, 5), (GREEN, 4), (BLUE, 3)])
    assert probe_video(out).frames == 12 == sv.frame_count


@pytest.mark.parametrize("prepend", [True, False])
def test_tiny_and_mixed_segment_lengths_keep_exact_timing(tmp_path, prepend):
    # 1- and 2-frame pieces between longer ones: the case where B-frame reorder delays would differ.
    sv = SegmentedVideo(tmp_path / "work", prepend=prepend)
    pieces = [(RED, 1), (GREEN, 6), (BLUE, 2), (YELLOW, 5)]
    for color, n in pieces:
        sv.add_finished(solid(color, n))
    sv.set_pending(solid(GRAY, 1))
    out = sv.publish(tmp_path / "p.mp4")
    runs = [(GRAY, 1), *pieces[::-1]] if prepend else [*pieces, (GRAY, 1)]
    assert_color_runs(out, runs)
    info = probe_video(out)
    assert info.frames == 15
    assert info.fps == pytest.approx(30.0)
    assert info.duration_s == pytest.approx(15 / 30, abs=0.02)


def test_pending_is_replaced_and_removed(tmp_path):
    sv = SegmentedVideo(tmp_path / "work", prepend=True)
    sv.add_finished(solid(RED, 4))
    sv.set_pending(solid(BLUE, 3))
    sv.set_pending(solid(YELLOW, 2))  # replaces, does not stack
    assert sv.frame_count == 6
    out = sv.publish(tmp_path / "p.mp4")
    assert_color_runs(out, [(YELLOW, 2), (RED, 4)])

    sv.set_pending(None)
    sv.add_finished(np.zeros((0, H, W, 3), np.uint8))  # an empty batch adds no segment
    assert sv.frame_count == 4 and len(sv.segment_paths) == 1
    assert not (tmp_path / "work" / "segments" / SegmentedVideo.PENDING_NAME).exists()
    sv.publish(out)
    assert_color_runs(out, [(RED, 4)])
    assert probe_video(out).frames == 4


def test_republish_after_more_segments_is_atomic(tmp_path):
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    target = out_dir / "job.mp4"
    sv = SegmentedVideo(tmp_path / "work", prepend=True)
    sv.add_finished(solid(RED, 4))
    sv.set_pending(solid(BLUE, 2))
    sv.publish(target, {"section": 1})
    first_inode = os.stat(target).st_ino

    sv.add_finished(solid(GREEN, 4))
    sv.set_pending(solid(MAGENTA, 2))
    sv.publish(target, {"section": 2})

    assert sorted(p.name for p in out_dir.iterdir()) == ["job.mp4"]  # no temp files next to it
    assert leftovers(tmp_path) == []
    # os.replace puts a brand-new file in place instead of rewriting the old one under a reader.
    assert os.stat(target).st_ino != first_inode
    assert_color_runs(target, [(MAGENTA, 2), (GREEN, 4), (RED, 4)])
    assert json.loads(probe_video(target).comment) == {"section": 2}


def test_finished_segments_are_never_reencoded(tmp_path, monkeypatch):
    encoded = []
    real_encode = video.encode_frames

    def counting_encode(path, frames, *args, **kwargs):
        encoded.append(len(frames))
        return real_encode(path, frames, *args, **kwargs)

    monkeypatch.setattr(video, "encode_frames", counting_encode)

    sv = SegmentedVideo(tmp_path / "work", prepend=True)
    sv.add_finished(solid(RED, 4))
    sv.set_pending(solid(BLUE, 3))
    sv.publish(tmp_path / "p.mp4")
    first = sv.segment_paths
    assert len(first) == 1 and first[0].parent == tmp_path / "work" / "segments"
    before = file_ids(first)

    for color in (GREEN, YELLOW, MAGENTA):
        sv.add_finished(solid(color, 4))
        sv.set_pending(solid(GRAY, 3))
        sv.publish(tmp_path / "p.mp4")

    assert file_ids(first) == before  # same inode, mtime, bytes
    # Each finished frame went through the encoder exactly once; only pending pieces repeat.
    assert encoded == [4, 3] + [4, 3] * 3
    assert len(sv.segment_paths) == 4
    assert probe_video(tmp_path / "p.mp4").frames == 19


def test_state_round_trip_resumes_without_reencoding(tmp_path):
    work = tmp_path / "work"
    sv = SegmentedVideo(work, fps=30, crf=18, prepend=True)
    sv.add_finished(solid(RED, 4))
    sv.add_finished(solid(GREEN, 3))
    sv.set_pending(solid(BLUE, 2))
    saved = json.loads(json.dumps(sv.state()))  # must survive a trip through a JSON file
    before = file_ids(sv.segment_paths)
    del sv

    resumed = SegmentedVideo.from_state(work, saved, fps=30, crf=18, prepend=True)
    assert resumed.frame_count == 9
    assert file_ids(resumed.segment_paths) == before
    resumed.add_finished(solid(YELLOW, 3))
    resumed.set_pending(solid(MAGENTA, 2))
    out = resumed.publish(tmp_path / "resumed.mp4")

    assert_color_runs(out, [(MAGENTA, 2), (YELLOW, 3), (GREEN, 3), (RED, 4)])
    assert probe_video(out).frames == 12 == resumed.frame_count
    assert file_ids(resumed.segment_paths[1:]) == before  # old segments untouched
    assert len({p.name for p in resumed.segment_paths}) == 3  # the new one did not overwrite one


def test_from_state_refuses_missing_segments_and_other_fps(tmp_path):
    work = tmp_path / "work"
    sv = SegmentedVideo(work, prepend=False)
    sv.add_finished(solid(RED, 3))
    sv.add_finished(solid(GREEN, 3))
    saved = sv.state()

    with pytest.raises(InputError, match="frame rate"):
        SegmentedVideo.from_state(work, saved, fps=24, crf=16, prepend=False)

    sv.segment_paths[1].unlink()
    with pytest.raises(OutputFolderError) as exc:
        SegmentedVideo.from_state(work, saved, fps=30, crf=16, prepend=False)
    assert one_sentence(str(exc.value)), str(exc.value)


def test_publish_without_frames_is_refused(tmp_path):
    sv = SegmentedVideo(tmp_path / "work", prepend=False)
    with pytest.raises(InputError):
        sv.publish(tmp_path / "empty.mp4")
    assert not (tmp_path / "empty.mp4").exists()


def test_sections_of_another_size_are_refused(tmp_path):
    sv = SegmentedVideo(tmp_path / "work", prepend=False)
    sv.add_finished(solid(RED, 2))
    with pytest.raises(InputError, match="same size"):
        sv.add_finished(np.zeros((2, H + 16, W, 3), np.uint8))


# --------------------------------------------------------------------------- failures


def test_missing_output_folder_raises_one_sentence(tmp_path):
    sv = SegmentedVideo(tmp_path / "work", prepend=False)
    sv.add_finished(solid(RED, 3))
    target = tmp_path / "no" / "such" / "dir" / "out.mp4"
    with pytest.raises(OutputFolderError) as exc:
        sv.publish(target)
    msg = str(exc.value)
    assert one_sentence(msg), msg
    assert "does not exist" in msg and str(target) in msg
    assert not target.exists()


def test_broken_segment_keeps_old_target_and_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.mp4"
    sv = SegmentedVideo(tmp_path / "work", prepend=False)
    sv.add_finished(solid(RED, 3))
    sv.publish(target)
    good = target.read_bytes()

    sv.add_finished(solid(GREEN, 3))
    seg = sv.segment_paths[-1]
    # Same size, garbage content: passes the size check, so the real ffmpeg must fail (not
    # silently skip the piece and publish a shorter video, which it does without -xerror).
    seg.write_bytes(b"x" * seg.stat().st_size)
    with pytest.raises(OutputFolderError) as exc:
        sv.publish(target)
    assert one_sentence(str(exc.value)), str(exc.value)
    assert target.read_bytes() == good  # the last good preview is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "work"]

    seg.write_bytes(b"truncated")
    with pytest.raises(OutputFolderError, match="missing or damaged") as exc:
        sv.publish(target)
    assert one_sentence(str(exc.value)), str(exc.value)
    assert target.read_bytes() == good


@pytest.mark.skipif(sys.platform == "win32", reason="fake ffmpeg is a shell script")
def test_disk_full_from_ffmpeg_stderr(tmp_path, monkeypatch):
    # A stand-in ffmpeg that writes half a file and then reports ENOSPC, as the real one does.
    fake = tmp_path / "fake_ffmpeg"
    fake.write_text(
        "#!/bin/sh\n"
        'for last; do :; done\n'
        'out="${last#file:}"\n'
        'printf partial > "$out"\n'
        'echo "[out#0/mp4] Error writing trailer: No space left on device" >&2\n'
        "exit 1\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    sv = SegmentedVideo(tmp_path / "work", prepend=True)
    sv.add_finished(solid(RED, 2))  # encoded with the real ffmpeg
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))

    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    with pytest.raises(OutputFolderError) as exc:
        sv.publish(out_dir / "job.mp4")
    msg = str(exc.value)
    assert one_sentence(msg), msg
    assert "disk is full" in msg and "free some space" in msg
    assert list(out_dir.iterdir()) == []  # neither the target nor the partial temp file

    with pytest.raises(OutputFolderError, match="disk is full"):
        sv.add_finished(solid(GREEN, 2))
    assert len(sv.segment_paths) == 1 and leftovers(tmp_path / "work") == []


def test_enospc_errno_maps_to_disk_full(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.tempfile, "mkstemp", no_space)
    with pytest.raises(OutputFolderError) as exc:
        files.atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert one_sentence(str(exc.value)) and "disk is full" in str(exc.value)


# --------------------------------------------------------------------------- small writers


def test_atomic_json_and_png(tmp_path):
    obj = {"b": 1, "a": "é"}
    files.atomic_write_json(tmp_path / "s.json", obj)
    text = (tmp_path / "s.json").read_text("utf-8")
    assert json.loads(text) == obj and text.index('"b"') < text.index('"a"') and "\n  " in text

    img = np.zeros((H, W, 3), np.uint8)
    img[:, :, 1] = 200
    files.save_png(tmp_path / "f.png", img)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "f.png").convert("RGB")), img)
    assert leftovers(tmp_path) == []
