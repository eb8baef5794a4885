"""Drift metrics on synthetic videos made here, and the report command on a foreign mp4."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from framepack_local.jobs import drift
from framepack_local.jobs.video import encode_frames

REPO = Path(__file__).resolve().parent.parent
FRAMES, SECTION = 73, 36  # two FramePack sections of window 9 (4*9*2 + 1 frames); the seam is frame 37


def texture(seed=0, size=64):
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, (size // 4, size // 4, 3))
    return np.kron(base, np.ones((4, 4, 1))).astype(np.uint8)  # 4 px blocks: sharp edges, mid-range colours


def measure(frames):
    return drift.DriftMeter(fps=30).add_all(frames).report(SECTION)


def steady():
    return [np.roll(texture(), i // 8, axis=1) for i in range(FRAMES)]  # a slow pan: same content, same clarity


def test_blur_over_time_shows_a_large_sharpness_delta_and_a_steady_video_none():
    from skimage.filters import gaussian

    img = texture()
    blurred = [(gaussian(img, sigma=3.0 * i / FRAMES, channel_axis=-1, preserve_range=True)).round().astype(np.uint8)
               for i in range(FRAMES)]
    blur, calm = measure(blurred), measure(steady())
    assert blur["delta"]["sharpness"] > 0.5 * blur["start"]["sharpness"]  # more than half the clarity is gone
    assert blur["sharpness_ratio"] < 0.5
    assert calm["delta"]["sharpness"] < 0.02 * calm["start"]["sharpness"]
    assert calm["delta"]["color"] < 0.5


def test_a_colour_shifted_second_half_shows_the_delta_e():
    frames = steady()
    for f in frames[FRAMES // 2:]:
        f[..., 0] = np.clip(f[..., 0].astype(int) + 40, 0, 255)  # a red cast
    shifted, calm = measure(frames), measure(steady())
    assert shifted["delta"]["color"] > 10  # CIEDE2000; 2-3 is a just-noticeable difference
    assert calm["delta"]["color"] < 0.5
    assert shifted["per_frame"]["delta_e"][0] == 0.0


def test_a_cut_in_the_middle_shows_a_seam_jump():
    frames = [texture(0)] * 37 + [texture(1)] * 36
    cut, calm = measure(frames), measure(steady())
    assert cut["seams"] == [37]
    assert cut["seam_jump"]["at"] == 37 and cut["seam_jump"]["max"] > 30  # 0-255 levels
    assert abs(calm["seam_jump"]["max"]) < 2


def test_identical_frames_give_zero_for_every_delta():
    embed_calls = []

    def embed(rgb):
        embed_calls.append(1)
        v = rgb.reshape(-1)[:16].astype(float)
        return v / np.linalg.norm(v)

    meter = drift.DriftMeter(fps=30, embed=embed, similarity_at={18, 55})
    report = meter.add_all([texture()] * FRAMES).report(SECTION)
    assert report["delta"] == {"sharpness": 0.0, "color": 0.0, "motion": 0.0, "similarity": 0.0}
    assert [s["frame"] for s in report["similarity"]] == [18, 55] and len(embed_calls) == 3  # the reference too


def test_edge_means_follow_the_paper_15_percent():
    values = np.arange(100, dtype=float)
    first, last = drift.edge_means(values)
    assert first == pytest.approx(np.mean(range(15))) and last == pytest.approx(np.mean(range(85, 100)))
    assert drift.contrast(values) == pytest.approx(85.0)
    sparse = np.full(100, np.nan)
    sparse[[50, 70]] = [0.9, 0.6]  # similarity on a few frames only: the first and last measured ones
    assert drift.edge_means(sparse) == (0.9, 0.6)


def test_report_runs_on_a_foreign_mp4(tmp_path):
    video = tmp_path / "clip.mp4"
    frames = steady()
    for f in frames[40:]:
        f[..., 2] = np.clip(f[..., 2].astype(int) + 50, 0, 255)
    encode_frames(video, np.stack(frames), fps=24, crf=18)
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "framepack_local", "report", str(video), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "delta" in proc.stdout and "sharpness" in proc.stdout
    data = json.loads((out / "drift.json").read_text())
    assert set(data["delta"]) >= {"sharpness", "color", "motion", "similarity"}
    assert data["delta"]["similarity"] is None  # no model folder for a foreign video
    assert data["delta"]["color"] > 5 and data["frames"] == FRAMES and data["fps"] == 24
    assert data["seams"] == [37]  # FramePack's default section length when the file does not say
    png = (out / "drift.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
