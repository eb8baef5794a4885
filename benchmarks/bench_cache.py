"""Steps computed per section and wall time with each step cache, on the tiny model, in one run.

With the shipped ratios MagCache's skip decisions depend only on the ratio table (not on the weights),
so the fraction of steps computed here is the one the real checkpoint gets; FirstBlockCache decides
from the data, so its tiny-model figure says nothing about the real model. Times are ratios within
this run (configurations alternate, medians reported): the whole job, and the sampling part alone
(job.json timings). On the tiny model the transformer is a small part of a step and a job is a few
seconds, so both are noisy and understate the real gain.

    python benchmarks/bench_cache.py [--steps 25] [--seconds 2] [--resolution 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from framepack_local.engine.generate import Engine  # noqa: E402
from framepack_local.errors import InputError  # noqa: E402
from framepack_local.jobs import store  # noqa: E402
from framepack_local.params import SPEED_PRESETS, JobParams  # noqa: E402
from framepack_local.weights.tiny import make_tiny_model  # noqa: E402

# The page's Speed presets (params.SPEED_PRESETS) and diffusers' FirstBlockCache at its default threshold.
CONFIGS = {**{name: preset for name, preset in SPEED_PRESETS.items()}, "first-block": {"cache": "first-block"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--window", type=int, default=9)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    models = make_tiny_model(work / "tiny")
    photo = work / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(photo)
    engine = Engine(device="cpu")
    rows = []
    for mode in ("inverted", "forward"):
        base = JobParams(image=str(photo), prompt="waves", seconds=args.seconds, window=args.window,
                         steps=args.steps, resolution=args.resolution, mode=mode, models=str(models))
        engine.generate(base.replace(outputs=str(work / "warmup")))  # loads the models once
        times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        sampling: dict[str, list[float]] = {name: [] for name in CONFIGS}
        computed: dict[str, list[int]] = {}
        for repeat in range(args.repeats):
            for name, settings in CONFIGS.items():
                params = base.replace(**settings, outputs=str(work / f"{mode}-{name}-{repeat}"))
                t0 = time.perf_counter()
                try:
                    result = engine.generate(params)
                except InputError as exc:
                    computed[name] = []
                    times[name].append(float("nan"))
                    print(f"{mode} {name}: {exc}", file=sys.stderr)
                    continue
                times[name].append(time.perf_counter() - t0)
                record = store.read_record(result.job_dir)
                computed[name] = record["steps_computed"]
                sampling[name].append(record["timings_s"]["sampling"])  # the part the cache changes
        off = statistics.median(times["off"])
        off_sampling = statistics.median(sampling["off"])
        for name in CONFIGS:
            per_section = computed.get(name) or []
            median = statistics.median(times[name])
            rows.append({
                "mode": mode, "speed": name, "cache": CONFIGS[name]["cache"], "steps": args.steps, "steps_computed": per_section,
                "fraction_computed": round(sum(per_section) / (args.steps * len(per_section)), 3) if per_section else None,
                "median_s": round(median, 2), "time_vs_off": round(median / off, 3) if per_section else None,
                "sampling_median_s": round(statistics.median(sampling[name]), 2),
                "sampling_vs_off": round(statistics.median(sampling[name]) / off_sampling, 3),
            })
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
