"""Load a full-size (13B) FramePack transformer in each storage and run one forward on the CPU.

    python benchmarks/make_fullsize_checkpoint.py /work/fullsize-ckpt
    python benchmarks/bench_fullsize.py /work/fullsize-ckpt --storages fp8,disk

Each storage runs in a fresh subprocess so memory peaks do not mix. Reported per storage: load time,
peak anonymous RAM (RssAnon: what cannot be paged out without swap), peak total RSS (plus pages of
memory-mapped files, which the OS can drop), and the time of one transformer forward at the smallest
bucket (base 64: a 416x960 photo -> 48x96 px -> 6x12 latents; window 9; 1+2+16 history latents;
729 SigLIP tokens; 512 LLaMA slots of which 30 are real). The forward runs block by block with a
time budget: if the budget runs out, the remaining blocks are extrapolated from the measured ones
and the result is labelled "extrapolated". A checkpoint written with fewer blocks (see
``benchmark.json``) is extrapolated per block to the full 20 + 40 the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("bench_fullsize")
GB = 1e9


# ---------------------------------------------------------------------------------------------
# child: one storage
# ---------------------------------------------------------------------------------------------


def _check_cpu_bf16():
    """(works, note): bf16 matmul on this CPU is finite and close to float32, and how fast each is."""
    import torch

    a, b = torch.randn(256, 512), torch.randn(512, 256)
    try:
        out = (a.bfloat16() @ b.bfloat16()).float()
    except RuntimeError as exc:
        return False, f"bf16 matmul raised {exc}"
    rel = ((out - a @ b).norm() / (a @ b).norm()).item()
    if not torch.isfinite(out).all() or rel > 2e-2:
        return False, f"bf16 matmul is off by {rel:.1%}"
    speeds = {}
    for dtype in (torch.bfloat16, torch.float32):
        x, w = torch.randn(1024, 3072, dtype=dtype), torch.randn(3072, 3072, dtype=dtype)
        x @ w
        t0 = time.perf_counter()
        for _ in range(3):
            x @ w
        speeds[str(dtype).replace("torch.", "")] = 3 * 2 * 1024 * 3072 * 3072 / (time.perf_counter() - t0) / 1e9
    return True, "bf16 matmul ok (rel err {:.2%}); GFLOP/s bf16 {:.0f}, fp32 {:.0f}".format(
        rel, speeds["bfloat16"], speeds["float32"])


def _inputs(config: dict, photo_hw: tuple[int, int], bucket: int, window: int, dtype):
    import torch

    from framepack_local.engine import schedule

    height, width = schedule.find_bucket(*photo_hw, base=bucket)
    h, w = height // 8, width // 8
    layout = schedule.section_layouts(1, window, "inverted")[0]
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    def idx(values):
        return torch.tensor(values, dtype=torch.long)

    text_len, real_tokens = 512, 30
    mask = torch.zeros(1, text_len, dtype=torch.long)
    mask[:, :real_tokens] = 1
    inputs = dict(
        hidden_states=r(1, 16, window, h, w),
        timestep=torch.tensor([1000.0 * 0.9]),
        encoder_hidden_states=r(1, text_len, config["text_embed_dim"]),
        encoder_attention_mask=mask,
        pooled_projections=r(1, config["pooled_projection_dim"]),
        image_embeds=r(1, 729, config["image_proj_dim"]),
        indices_latents=idx(layout.indices_latents),
        guidance=torch.tensor([10.0 * 1000.0], dtype=dtype),
        latents_clean=r(1, 16, len(layout.indices_clean), h, w),
        indices_latents_clean=idx(layout.indices_clean),
        latents_history_2x=r(1, 16, len(layout.indices_2x), h, w),
        indices_latents_history_2x=idx(layout.indices_2x),
        latents_history_4x=r(1, 16, len(layout.indices_4x), h, w),
        indices_latents_history_4x=idx(layout.indices_4x),
        return_dict=False,
    )
    return inputs, (height, width, h, w)


class _OverBudget(Exception):
    pass


def _timed_forward(model, inputs, budget_s: float) -> dict:
    """One forward with per-block timings; past ``budget_s`` it stops and extrapolates the rest."""
    import torch

    blocks = [("dual", b) for b in model.transformer_blocks] + [("single", b) for b in model.single_transformer_blocks]
    times: dict[str, list[float]] = {"dual": [], "single": []}
    state: dict = {"first_block_at": None, "last_args": None, "last_out": None}
    started = time.perf_counter()
    handles = []

    def pre(kind):
        def hook(module, args):
            now = time.perf_counter()
            if state["first_block_at"] is None:
                state["first_block_at"] = now
            if now - started > budget_s:
                raise _OverBudget
            state["t0"] = now
            state["last_args"] = args
        return hook

    def post(kind):
        def hook(module, args, output):
            times[kind].append(time.perf_counter() - state["t0"])
            state["last_out"] = output
        return hook

    for kind, block in blocks:
        handles.append(block.register_forward_pre_hook(pre(kind)))
        handles.append(block.register_forward_hook(post(kind)))
    result = {"complete": True}
    try:
        with torch.no_grad():
            try:
                out = model(**inputs)[0]
                result["finite"] = bool(torch.isfinite(out).all())
            except _OverBudget:
                result["complete"] = False
                if not times["single"]:
                    # time two single-stream blocks on the activations the last dual block produced
                    hidden, encoder = state["last_out"]
                    _, _, temb, mask, rope = state["last_args"]
                    for block in list(model.single_transformer_blocks)[:2]:
                        t0 = time.perf_counter()
                        hidden, encoder = block(hidden, encoder, temb, mask, rope)
                        times["single"].append(time.perf_counter() - t0)
    finally:
        for handle in handles:
            handle.remove()
    total = time.perf_counter() - started
    per_dual = sum(times["dual"]) / max(1, len(times["dual"]))
    per_single = sum(times["single"]) / max(1, len(times["single"]))
    blocks_time = sum(times["dual"]) + sum(times["single"])
    nonblock = (state["first_block_at"] - started) if state["first_block_at"] else total
    if result["complete"]:
        nonblock = total - blocks_time
    result.update(measured_s=total, per_dual_s=per_dual, per_single_s=per_single, nonblock_s=nonblock,
                  dual_timed=len(times["dual"]), single_timed=len(times["single"]))
    return result


def _watchdog(limit_bytes: float):
    """Abort this process (not the machine) if its anonymous RSS passes ``limit_bytes``."""
    from framepack_local.memory.measure import anon_rss_bytes

    def run():
        while True:
            used = anon_rss_bytes()
            if used > limit_bytes:
                print(json.dumps({"error": f"aborted: RssAnon {used / GB:.1f} GB passed the {limit_bytes / GB:.0f} GB limit"}),
                      flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=run, daemon=True, name="ram-watchdog").start()


def child(args) -> dict:
    import torch

    from framepack_local.memory import measure
    from framepack_local.weights import fp8_cache, storage as weight_storage

    _watchdog(args.ram_limit_gb * GB)
    folder = args.dir
    config = json.loads((folder / "config.json").read_text())
    bench_info = json.loads((folder / "benchmark.json").read_text()) if (folder / "benchmark.json").is_file() else {}
    full_dual = bench_info.get("full_num_layers", config["num_layers"])
    full_single = bench_info.get("full_num_single_layers", config["num_single_layers"])

    bf16_ok, cpu_note = _check_cpu_bf16()
    compute = torch.bfloat16 if (bf16_ok and args.compute != "float32") else torch.float32
    row: dict = {"storage": args.storage, "compute": str(compute).replace("torch.", ""), "cpu_bf16": cpu_note,
                 "threads": torch.get_num_threads(), "blocks": [config["num_layers"], config["num_single_layers"]],
                 "full_blocks": [full_dual, full_single]}
    if compute == torch.float32 and args.compute != "float32":
        row["note"] = "CPU bf16 matmul unusable; float32 compute"

    if args.storage == "disk":
        # The one-time conversion, measured on its own; the load below maps the existing copy.
        with measure.PeakSampler(total=True) as peak:
            t0 = time.perf_counter()
            fp8_cache.ensure_fp8_cache(folder, compute, args.cache_dir)
            row["convert_s"] = time.perf_counter() - t0
        row["convert_peak_anon"] = peak.peak
    base_anon = measure.anon_rss_bytes()
    with measure.PeakSampler(total=True) as peak:
        t0 = time.perf_counter()
        # "fp8-mapped": fp8 as the GPU path loads it, the uncast bf16 tensors left on file pages.
        storage = "fp8" if args.storage == "fp8-mapped" else args.storage
        model = weight_storage.load_transformer(folder, storage, compute, cache_dir=args.cache_dir,
                                         keep_mapped=args.storage == "fp8-mapped")
        row["load_s"] = time.perf_counter() - t0
    row.update(base_anon=base_anon, load_peak_anon=peak.peak, load_peak_rss=peak.peak_rss)
    row["model_bytes"] = sum(t.numel() * t.dtype.itemsize for t in model.parameters())

    inputs, (height, width, h, w) = _inputs(config, args.photo, args.bucket, args.window, compute)
    row["bucket"] = f"{height}x{width} px, {h}x{w} latents, window {args.window}"
    with measure.PeakSampler(total=True) as peak:
        timing = _timed_forward(model, inputs, args.forward_budget_s)
    row.update(forward_peak_anon=peak.peak, forward_peak_rss=peak.peak_rss, **timing)

    # Per-block extrapolation to the full model: missing blocks (budget or a reduced checkpoint).
    row["forward_extrapolated"] = not timing["complete"] or [full_dual, full_single] != row["blocks"]
    row["forward_s"] = (timing["nonblock_s"] + full_dual * timing["per_dual_s"] + full_single * timing["per_single_s"]
                        if row["forward_extrapolated"] else timing["measured_s"])
    if [full_dual, full_single] != row["blocks"] and args.storage != "disk":
        per_block = weight_storage.transformer_block_bytes(config, args.storage, compute)
        extra = (full_dual - config["num_layers"]) * per_block[0] + (full_single - config["num_single_layers"]) * per_block[-1]
        row["ram_extrapolated_extra"] = extra
    return row


# ---------------------------------------------------------------------------------------------
# parent: one subprocess per storage, then the table
# ---------------------------------------------------------------------------------------------


def _fmt_gb(value) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| storage | compute | load s | peak RssAnon load (GB) | peak RSS incl. mapped files, load (GB) | forward s "
        "| peak RssAnon forward (GB) | peak RSS forward (GB) | weights (GB) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row or "skipped" in row:
            lines.append(f"| {row['storage']} | - | - | - | - | - | - | - | - | {row.get('error') or row.get('skipped')} |")
            continue
        notes = []
        if row.get("convert_s") is not None:
            notes.append(f"one-time fp8 copy written in {row['convert_s']:.0f} s "
                         f"(peak RssAnon {_fmt_gb(row['convert_peak_anon'])} GB)")
        if row["forward_extrapolated"]:
            notes.append(f"forward EXTRAPOLATED per block from {row['dual_timed']} dual + {row['single_timed']} single "
                         f"timed blocks ({row['per_dual_s']:.1f} s / {row['per_single_s']:.1f} s each)")
        else:
            notes.append(f"full forward measured ({row['per_dual_s']:.1f} s per dual, {row['per_single_s']:.1f} s "
                         f"per single block), output finite: {row.get('finite')}")
        if row.get("ram_extrapolated_extra"):
            notes.append(f"RAM EXTRAPOLATED: add {_fmt_gb(row['ram_extrapolated_extra'])} GB for the blocks not in this "
                         f"checkpoint")
        if row.get("note"):
            notes.append(row["note"])
        notes.append(f"process baseline RssAnon {_fmt_gb(row['base_anon'])} GB")
        lines.append(
            f"| {row['storage']} | {row['compute']} | {row['load_s']:.0f} | {_fmt_gb(row['load_peak_anon'])} "
            f"| {_fmt_gb(row['load_peak_rss'])} | {row['forward_s']:.0f}{' (extrapolated)' if row['forward_extrapolated'] else ''} "
            f"| {_fmt_gb(row['forward_peak_anon'])} "
            f"| {_fmt_gb(row['forward_peak_rss'])} | {_fmt_gb(row['model_bytes'])} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def parent(args) -> int:
    import psutil

    config = json.loads((args.dir / "config.json").read_text())
    from framepack_local.weights import storage as weight_storage

    bf16_bytes = sum(weight_storage.transformer_block_bytes(config, "bf16")) + weight_storage.transformer_nonblock_bytes(config, "bf16")
    total_ram = psutil.virtual_memory().total
    rows = []
    for storage in args.storages:
        if storage == "bf16" and total_ram < bf16_bytes + 4 * GB:
            rows.append({"storage": storage, "skipped": f"skipped: {bf16_bytes / GB:.1f} GB of bf16 weights + 4 GB "
                                                        f"do not fit {total_ram / GB:.1f} GB RAM"})
            print(f"[{storage}] {rows[-1]['skipped']}", flush=True)
            continue
        command = [sys.executable, str(Path(__file__).resolve()), str(args.dir), "--child", "--storages", storage,
                   "--bucket", str(args.bucket), "--window", str(args.window), "--photo", f"{args.photo[0]}x{args.photo[1]}",
                   "--forward-budget-s", str(args.forward_budget_s), "--ram-limit-gb", str(args.ram_limit_gb),
                   "--compute", args.compute]
        if args.cache_dir is not None:
            command += ["--cache-dir", str(args.cache_dir)]
        print(f"[{storage}] running {' '.join(command)}", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=args.child_timeout_s)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"error": f"exit code {proc.returncode}, no result"}
        row["storage"] = storage
        rows.append(row)
        print(f"[{storage}] done in {time.perf_counter() - started:.0f} s: {json.dumps(row)}", flush=True)

    print()
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{total_ram / GB:.1f} GB RAM; checkpoint {args.dir} ({config['num_layers']} dual + "
          f"{config['num_single_layers']} single blocks, {bf16_bytes / GB:.1f} GB bf16)")
    first = next((r for r in rows if "cpu_bf16" in r), None)
    if first:
        print(f"CPU: {first['cpu_bf16']}; torch threads {first['threads']}; bucket {first['bucket']}")
    print()
    print(table(rows))
    return 0 if all("error" not in r for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="transformer folder (config.json + safetensors shards)")
    parser.add_argument("--storages", default="fp8,disk,bf16")
    parser.add_argument("--bucket", type=int, default=64, help="resolution base for schedule.find_bucket")
    parser.add_argument("--photo", default="416x960", help="HxW of the (imaginary) input photo")
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where 'disk' writes its fp8 copy")
    parser.add_argument("--compute", choices=("auto", "float32"), default="auto",
                        help="auto: bf16 when CPU bf16 matmul works, else float32")
    parser.add_argument("--forward-budget-s", type=float, default=600.0,
                        help="stop the forward after this long and extrapolate the remaining blocks")
    parser.add_argument("--ram-limit-gb", type=float, default=20.0, help="abort a child whose RssAnon passes this")
    parser.add_argument("--child-timeout-s", type=float, default=3 * 3600)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    args.photo = tuple(int(v) for v in args.photo.lower().split("x"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.child:
        args.storage = args.storages[0]
        row = child(args)
        print(json.dumps(row), flush=True)
        return 0
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
