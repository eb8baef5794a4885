"""Benchmark: a 600 s job on the tiny model, inverted and forward, through the command line.

Reports per-section wall time and resident memory at chosen sections (they must stay flat), the job
folder's disk use against the final mp4's size, and, for one mode, the time a resume takes after a
kill -9 at a chosen section (process start to the first new section, against a fresh job's start).

    python benchmarks/bench_long.py                                  # 600 s, window 2 (2 250 sections)
    python benchmarks/bench_long.py --seconds 120 --points 1 50 100 --kill-at 50    # a quick look

Both modes run at the same time, one CPU thread each (the machine's noise hits both alike). The
tiny model at the 64 px bucket with one step makes the sampling cheap, so what is measured is
everything around it: decoding, encoding segments, publishing previews, writing job.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DONE_RE = re.compile(r"section (\d+)/(\d+) done: .* in ([\d.]+) s \(([\d.]+) s elapsed, RAM (\d+) MB, peak (\d+) MB\)")
SAMPLING_RE = re.compile(r"Sampling section (\d+) of (\d+)")
JOB_RE = re.compile(r"-> (\S+)$")


class Run:
    """One CLI process; its log lines parsed as they arrive."""

    def __init__(self, args: list[str], env: dict, kill_at: int | None = None) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "framepack_local", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.kill_at = kill_at
        self.sections: dict[int, dict] = {}
        self.first_sampling: tuple[int, float] | None = None
        self.job_dir: Path | None = None
        self.total = 0
        self.killed = False
        self.tail: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            now = time.perf_counter() - self.started
            self.tail = (self.tail + [line.rstrip()])[-20:]
            if self.job_dir is None and (m := JOB_RE.search(line.strip())) and "job " in line:
                self.job_dir = Path(m.group(1))
            if self.first_sampling is None and (m := SAMPLING_RE.search(line)):
                self.first_sampling = (int(m.group(1)), now)
            if m := DONE_RE.search(line):
                n = int(m.group(1))
                self.total = int(m.group(2))
                self.sections[n] = {"seconds": float(m.group(3)), "rss_mb": int(m.group(5)),
                                    "peak_mb": int(m.group(6)), "at_s": now}
                if self.kill_at is not None and n >= self.kill_at and not self.killed:
                    self.killed = True
                    os.kill(self.proc.pid, signal.SIGKILL)

    def wait(self) -> int:
        code = self.proc.wait()
        self.reader.join()
        return code


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def at_point(sections: dict[int, dict], point: int) -> dict | None:
    """The section's own numbers, and the median time of the ten around it (one section is noisy)."""
    if point not in sections:
        return None
    near = sorted(sections[n]["seconds"] for n in range(point - 5, point + 5) if n in sections)
    return {**sections[point], "median10_s": near[len(near) // 2]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--window", type=int, default=2, help="latent window; 2 gives 8 frames per section")
    ap.add_argument("--modes", nargs="+", default=["inverted", "forward"])
    ap.add_argument("--points", type=int, nargs="+", default=[1, 100, 500, 1000, 1800])
    ap.add_argument("--kill-at", type=int, default=1000, help="kill -9 the forward job after this section, resume")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fpl-long-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    models = work / "tiny"
    if not (models / "transformer").is_dir():
        subprocess.run([sys.executable, "-m", "framepack_local", "make-tiny-model", str(models)], cwd=REPO, env=env,
                       check=True, capture_output=True)
    photo = work / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)).save(photo)

    def job_args(mode: str) -> list[str]:
        return ["generate", "--image", str(photo), "--prompt", "a long road", "--seconds", str(args.seconds),
                "--window", str(args.window), "--steps", "1", "--resolution", "64", "--cache", "off",
                "--mode", mode, "--models", str(models), "--outputs", str(work / f"out-{mode}")]

    kill_mode = "forward" if "forward" in args.modes else args.modes[0]
    t0 = time.perf_counter()
    runs = {mode: Run(job_args(mode), env, args.kill_at if mode == kill_mode else None) for mode in args.modes}
    results: dict = {"seconds": args.seconds, "window": args.window, "modes": {}}
    for mode, run in runs.items():
        code = run.wait()
        entry: dict = {"sections": run.total, "exit": code}
        if run.killed:
            # The resume: a new process, from start to its first new section.
            resume = Run(["resume", str(run.job_dir)], env)
            code = resume.wait()
            entry["exit_after_resume"] = code
            first = resume.first_sampling
            entry["killed_after"] = max(run.sections)
            entry["resume_to_first_sampling_s"] = first[1] if first else None
            entry["fresh_start_to_first_sampling_s"] = run.first_sampling[1] if run.first_sampling else None
            run.sections.update(resume.sections)
            run.tail += resume.tail
        if entry.get("exit_after_resume", code) != 0:
            print("\n".join(run.tail), file=sys.stderr)
            raise SystemExit(f"the {mode} job failed")
        entry["points"] = {p: at_point(run.sections, p) for p in args.points}
        job = run.job_dir
        video = job / "video.mp4"
        entry["disk"] = {"job_folder": folder_bytes(job), "final_mp4": video.stat().st_size,
                         "sections": folder_bytes(job / "sections"), "segments": folder_bytes(job / "segments"),
                         "job_json": (job / "job.json").stat().st_size,
                         "files": sum(1 for f in job.rglob("*") if f.is_file())}
        entry["wall_s"] = time.perf_counter() - t0
        results["modes"][mode] = entry

    for mode, entry in results["modes"].items():
        print(f"\n{mode}: {entry['sections']} sections of {4 * args.window} frames, {args.seconds:g} s, "
              f"wall {entry['wall_s'] / 60:.1f} min")
        print(f"{'section':>8}  {'time (s)':>8}  {'median of 10':>12}  {'RSS (MB)':>8}  {'peak RSS (MB)':>13}")
        for p, row in entry["points"].items():
            if row:
                print(f"{p:>8}  {row['seconds']:>8.3f}  {row['median10_s']:>12.3f}  {row['rss_mb']:>8}  "
                      f"{row['peak_mb']:>13}")
        d = entry["disk"]
        print(f"disk: job folder {d['job_folder'] / 1e6:.1f} MB in {d['files']} files = final mp4 "
              f"{d['final_mp4'] / 1e6:.1f} MB + segments {d['segments'] / 1e6:.1f} MB + section latents "
              f"{d['sections'] / 1e6:.1f} MB + job.json {d['job_json'] / 1e3:.0f} kB + inputs")
        if "killed_after" in entry:
            print(f"kill -9 after section {entry['killed_after']}; resume: process start to sampling the next "
                  f"section {entry['resume_to_first_sampling_s']:.1f} s (a fresh job: "
                  f"{entry['fresh_start_to_first_sampling_s']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwork folder: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
