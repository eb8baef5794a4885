"""Benchmark: what the drift report, colour correction and retry scoring cost per section.

Two parts:
1. The tiny model, a real job through the command line (default settings, 128 px): the report's seconds
   from job.json's timings against the job's seconds per section.
2. The 640 bucket (608x640, window 9: 36 frames per section), synthetic decoded frames: the report
   over an mp4 (decode + per-frame metrics), SigLIP on one frame with the real encoder's shapes
   (so400m-patch14-384, random weights, on this CPU), colour correction of one section, and the
   retry scores of one section. Shown against the reference app's published RTX 4090 rate
   (1.5 s/frame with TeaCache, PEERS.md), i.e. 54 s per 36-frame section; a laptop is 4-8x slower.

    python benchmarks/bench_drift.py                    # both parts, ~3 min on 2 cores
    python benchmarks/bench_drift.py --sections 4       # a shorter synthetic video
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from framepack_local.engine import color, drift as engine_drift, retry  # noqa: E402
from framepack_local.jobs import video  # noqa: E402

REFERENCE_SECTION_S = 1.5 * 36  # the reference app on an RTX 4090 with TeaCache, one 36-frame section
HEIGHT, WIDTH, SECTION_FRAMES = 608, 640, 36


def tiny_job(work: Path) -> list[str]:
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    models = work / "tiny"
    if not models.is_dir():
        subprocess.run([sys.executable, "-m", "framepack_local", "make-tiny-model", str(models)], cwd=REPO,
                       env=env, check=True, capture_output=True)
    photo = work / "photo.png"
    Image.fromarray(synthetic_frame(0, 128, 128)).save(photo)
    out = work / "outputs"
    proc = subprocess.run([sys.executable, "-m", "framepack_local", "generate", "--image", str(photo),
                           "--prompt", "a drifting test", "--models", str(models), "--outputs", str(out),
                           "--seconds", "5", "--resolution", "128"], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    record = json.loads(next(out.glob("*/job.json")).read_text())
    t, sections = record["timings"], record["sections_done"]
    per_section = (t["total"] - t.get("drift", 0.0)) / sections
    cost = t["drift"] / sections
    return ["| tiny model, 128 px, default steps | sections | s per section (job) | report s per section | share |",
            "|---|---|---|---|---|",
            f"| {record['width']}x{record['height']}, {record['frames']} frames | {sections} | {per_section:.2f} "
            f"| {cost:.3f} | {cost / per_section:.1%} |"]


def synthetic_frame(i: int, height: int, width: int) -> np.ndarray:
    """A textured picture that pans and darkens slowly (some motion, some colour drift)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.sin((x + 3 * i) / 17.0) * np.cos(y / 23.0) * 60 + 128
    rgb = np.stack([base, base * 0.9 + 20, 255 - base], axis=-1) * (1 - 0.002 * i)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def real_shape_siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from framepack_local.weights.model_folder import siglip_image_processor_class

    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, image_size=384, patch_size=14)
    torch.manual_seed(0)
    model = SiglipVisionModel(config).eval()
    processor = siglip_image_processor_class()(size={"height": 384, "width": 384}, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3)
    return engine_drift.SiglipEmbedder(model, processor, "cpu")


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bucket_640(work: Path, sections: int) -> list[str]:
    frames = [synthetic_frame(i, HEIGHT, WIDTH) for i in range(sections * SECTION_FRAMES)]
    path = work / "synthetic-640.mp4"
    video.encode_frames(path, np.stack(frames), fps=30, crf=16)
    n = len(frames)
    report_s = best_of(lambda: engine_drift.measure(path, n, 30.0, SECTION_FRAMES), 2) / sections

    embed = real_shape_siglip()
    embed(frames[0])  # first call: allocations
    siglip_s = best_of(lambda: embed(frames[SECTION_FRAMES // 2]))

    section = torch.from_numpy(np.stack(frames[:SECTION_FRAMES + 3])).float() / 127.5 - 1  # decoded range
    corrector = color.ColourCorrector.for_job("start", 1.0, frames[0], None, 0)
    new = color.new_frames(section.shape[0], 3, True, False)
    colour_s = best_of(lambda: corrector.correct(section, new, False))

    reference = embed(frames[0])
    score_s = best_of(lambda: retry.score(section, new, True, embed, reference))

    rows = [f"| 640 bucket ({WIDTH}x{HEIGHT}), {SECTION_FRAMES} frames per section | s per section "
            f"| share of {REFERENCE_SECTION_S:.0f} s (4090) |", "|---|---|---|"]
    for name, s in (("drift report: mp4 decode + metrics", report_s), ("drift report: SigLIP, one frame", siglip_s),
                    ("drift report, total", report_s + siglip_s), ("colour correction (start)", colour_s),
                    ("retry scores (3 sharpness frames, seam, SigLIP)", score_s)):
        rows.append(f"| {name} | {s:.3f} | {s / REFERENCE_SECTION_S:.2%} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", type=int, default=6, help="sections in the synthetic 640-bucket video")
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-drift-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lines = [f"torch threads {torch.get_num_threads()}", ""] + tiny_job(work) + [""] + bucket_640(work, args.sections)
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
