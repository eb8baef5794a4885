"""Benchmark: cost of publishing a preview after every section vs encoding the video once.

Simulates an inverted-mode job (sections generated from the end backwards, prepended):
after each section it encodes the finished frames once (add_finished), re-encodes the
small pending piece (set_pending) and stream-copies everything into the preview mp4
(publish). Then it encodes the same finished frames once, streamed through a single
ffmpeg process, as a reference. Frames are synthetic and generated per section, so the
whole video is never held in RAM.

    python benchmarks/bench_previews.py                       # 120 s at the 640 bucket (608x640)
    python benchmarks/bench_previews.py --height 320 --width 304   # quicker
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from framepack_local.jobs.video import SegmentedVideo, encode_frames, probe_video  # noqa: E402

FPS = 30


def section_frames(section: int, count: int, height: int, width: int, tint: int = 0) -> np.ndarray:
    """Cheap moving-gradient frames; frame content depends only on (section, index)."""
    t = (section * 1000 + np.arange(count))[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    frames = np.empty((count, height, width, 3), np.uint8)
    frames[..., 0] = (x + 4 * t) % 256
    frames[..., 1] = (2 * y + 3 * t + tint) % 256
    frames[..., 2] = ((x + y) // 2 + 5 * t) % 256
    return frames


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120.0, help="video length to simulate (default 120)")
    ap.add_argument("--window", type=int, default=9, help="latent window size; a section is 4*window frames (default 9)")
    ap.add_argument("--height", type=int, default=640)
    ap.add_argument("--width", type=int, default=608)
    ap.add_argument("--crf", type=int, default=16)
    ap.add_argument("--work-dir", type=Path, default=None, help="where segments and mp4s go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)

    n = max(1, round(args.seconds * FPS / (4 * args.window)))
    per_section = 4 * args.window
    pending_len = max(1, 4 * args.window - 3)
    h, w = args.height, args.width

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fpl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        video = SegmentedVideo(work / "job", fps=FPS, crf=args.crf, prepend=True)
        preview = work / "preview.mp4"
        t_add = t_pending = t_publish = 0.0
        first_publish = last_publish = 0.0
        for s in range(n):
            finished = section_frames(s, per_section, h, w)  # generation is not timed
            pending = section_frames(s + 1, pending_len, h, w, tint=60)

            t0 = time.perf_counter()
            video.add_finished(finished)
            t1 = time.perf_counter()
            video.set_pending(pending)
            t2 = time.perf_counter()
            video.publish(preview, {"section": s + 1, "of": n})
            t3 = time.perf_counter()
            t_add += t1 - t0
            t_pending += t2 - t1
            t_publish += t3 - t2
            if s == 0:
                first_publish = t3 - t2
            last_publish = t3 - t2
        del finished, pending
        preview_total = t_add + t_pending + t_publish
        preview_info = probe_video(preview)

        # Reference: the finished frames encoded once, in time order (inverted mode: the last
        # generated section comes first), streamed section by section through one ffmpeg.
        gen_time = 0.0

        def all_finished():
            nonlocal gen_time
            for s in reversed(range(n)):
                g0 = time.perf_counter()
                frames = section_frames(s, per_section, h, w)
                gen_time += time.perf_counter() - g0  # not encoding work: subtracted below
                yield frames

        final = work / "final_once.mp4"
        t0 = time.perf_counter()
        encode_frames(final, all_finished(), fps=FPS, crf=args.crf)
        final_once = time.perf_counter() - t0 - gen_time
        final_info = probe_video(final)

        total_frames = n * per_section
        assert final_info.frames == total_frames, final_info
        assert preview_info.frames == total_frames + pending_len, preview_info

        rows = [
            ("size", f"{w}x{h}"),
            ("sections", f"{n}"),
            ("finished frames", f"{total_frames} ({total_frames / FPS:.1f} s)"),
            ("pending frames / section", f"{pending_len}"),
            ("add_finished total", f"{t_add:.2f} s"),
            ("set_pending total", f"{t_pending:.2f} s"),
            ("publish total", f"{t_publish:.2f} s (first {first_publish * 1000:.0f} ms, last {last_publish * 1000:.0f} ms)"),
            ("total preview time", f"{preview_total:.2f} s"),
            ("final encoded once", f"{final_once:.2f} s"),
            ("ratio preview/final", f"{preview_total / final_once:.2f}x"),
            ("final preview size", f"{preview.stat().st_size / 1e6:.1f} MB"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    finally:
        if args.keep or args.work_dir is not None:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
