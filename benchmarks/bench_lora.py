"""What a LoRA costs: RAM/VRAM of its factors, the switch time, the extra compute, and what merging would cost.

Two parts, in one run:

- the tiny model (a tiny random model folder, built here unless --models is given): file and adapter
  bytes, anonymous RSS the adapters add, the switch time (read + sha256 + convert + check + attach) and
  a transformer forward with and without the adapters, on the CPU;
- the real 13B configuration on the meta device (no weights): the bytes of a rank-32 and a rank-128 LoRA
  on every block Linear, the extra multiply-adds per step, and the switch time for a real-size file
  (written to --scratch in kohya layout, the largest layout on disk). Merging instead of adapters is
  timed on one real-size dual-stream block (bf16 weights, W += w B A per layer) and scaled to 60 blocks.

    python benchmarks/bench_lora.py [--ranks 32,128] [--scratch /tmp] [--models DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from framepack_local.memory.measure import PeakSampler, anon_rss_bytes  # noqa: E402
from framepack_local.weights import lora, lora_runtime, model_folder  # noqa: E402
from framepack_local.weights.casting import build_meta_model  # noqa: E402
from framepack_local.weights.model_folder import FRAMEPACK_TRANSFORMER_CONFIG  # noqa: E402
from framepack_local.weights.tiny import make_tiny_model  # noqa: E402

MB = 1024**2


def timed(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def block_linears(config: dict) -> dict[str, tuple[int, int]]:
    # musubi-tuner targets the dual- and single-stream blocks (every Linear in them)
    return {n: s for n, s in lora.transformer_linears(config).items() if n.startswith(lora_runtime.BLOCK_PREFIXES)}


def write_kohya(path: Path, linears: dict[str, tuple[int, int]], rank: int) -> Path:
    """A random rank-``rank`` LoRA on every block Linear, bf16, kohya names (the transformer's, flattened)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (i, o) in linears.items():
        flat = "lora_unet_" + name.replace(".", "_")
        tensors[f"{flat}.lora_down.weight"] = (torch.randn(rank, i, generator=g) * 0.01).to(torch.bfloat16)
        tensors[f"{flat}.lora_up.weight"] = (torch.randn(o, rank, generator=g) * 0.01).to(torch.bfloat16)
        tensors[f"{flat}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def _trim() -> None:
    """Give freed heap back to the OS (glibc), so the next RssAnon baseline is not inflated by it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def switch(model, path: Path, config: dict, dtype: torch.dtype) -> dict:
    """One job's LoRA switch: read + sha256 + convert + check, then attach (the file's tensors let go, as
    the engine does); the parts' times, the RssAnon peak above the start and what stays while attached."""
    _trim()
    with PeakSampler(interval=0.02) as peak:
        t0 = time.perf_counter()
        loaded = lora.load_lora(path, 0.8, config)
        t1 = time.perf_counter()
        adapters = lora_runtime.LoraAdapters(model, [loaded], dtype)
        loaded.factors = {}
        t2 = time.perf_counter()
        kept = anon_rss_bytes() - peak.baseline
    result = {"load_s": t1 - t0, "attach_s": t2 - t1, "adapter_bytes": adapters.bytes, "layers": adapters.layers,
              "peak_rss": peak.growth, "kept_rss": kept}
    adapters.close()
    return result


def tiny_part(models: Path, ranks: list[int], scratch: Path) -> list[str]:
    from transformer_inputs import tiny_inputs

    config = json.loads((models / "transformer" / "config.json").read_text())
    linears = block_linears(config)
    model = model_folder.load_part(models, "transformer", "cpu", torch.float32)
    inputs = tiny_inputs()

    def forward():
        with torch.no_grad():
            return model(**inputs)[0]

    rows = ["| model | rank | file MB | adapter MB (RAM, or VRAM on the GPU) | switch s (read+check / attach) | "
            "forward ms without / with (medians, alternating) |", "|---|---|---|---|---|---|"]
    for rank in ranks:
        path = write_kohya(scratch / f"tiny-r{rank}.safetensors", linears, rank)
        loaded = lora.load_lora(path, 0.8, config)
        plain, with_lora = [], []
        for _ in range(9):  # alternate, so load from other processes hits both alike
            plain.append(timed(forward, 1)[0])
            with lora_runtime.LoraAdapters(model, [loaded], torch.float32) as adapters:
                with_lora.append(timed(forward, 1)[0])
                nbytes = adapters.bytes
        s = switch(model, path, config, torch.float32)
        rows.append(f"| tiny ({len(linears)} block layers, width {config['num_attention_heads'] * config['attention_head_dim']}) "
                    f"| {rank} | {path.stat().st_size / MB:.2f} | {nbytes / MB:.2f} | "
                    f"{s['load_s'] + s['attach_s']:.3f} ({s['load_s']:.3f} / {s['attach_s']:.4f}) | "
                    f"{statistics.median(plain) * 1e3:.0f} / {statistics.median(with_lora) * 1e3:.0f} |")
    return rows


def real_part(ranks: list[int], scratch: Path) -> list[str]:
    config = dict(FRAMEPACK_TRANSFORMER_CONFIG)
    linears = block_linears(config)
    meta = build_meta_model(config)  # hooks attach to its modules; no weights exist
    rows = ["| model | rank | file MB (bf16) | adapter MB bf16 (RAM or VRAM) | extra multiply-adds per step | "
            "switch s (read+sha256+convert+check / attach) | RssAnon peak / kept MB |", "|---|---|---|---|---|---|---|"]
    for rank in ranks:
        path = write_kohya(scratch / f"real-r{rank}.safetensors", linears, rank)
        runs = [switch(meta, path, config, torch.bfloat16) for _ in range(3)]
        s = min(runs, key=lambda r: r["load_s"] + r["attach_s"])  # the least disturbed of three
        # memory from the first run: later ones reuse what the allocator kept from the one before
        s = {**s, "peak_rss": runs[0]["peak_rss"], "kept_rss": runs[0]["kept_rss"]}
        frac = lora_runtime.lora_flops_fraction(linears, rank)
        rows.append(f"| 13B ({len(linears)} block layers) | {rank} | {path.stat().st_size / MB:.0f} | "
                    f"{s['adapter_bytes'] / MB:.0f} | {frac:.1%} | {s['load_s'] + s['attach_s']:.2f} "
                    f"({s['load_s']:.2f} / {s['attach_s']:.2f}) | {s['peak_rss'] / MB:.0f} / {s['kept_rss'] / MB:.0f} |")
        path.unlink()
    return rows


def merge_part(ranks: list[int]) -> list[str]:
    """W += w B A on one real-size dual-stream and one single-stream block (bf16 weights as the checkpoint has,
    the product in float32: this CPU's bf16 matmul with an inner size of 32 is ~13x slower), scaled to 60."""
    config = dict(FRAMEPACK_TRANSFORMER_CONFIG)
    linears = block_linears(config)
    double = {n: s for n, s in linears.items() if n.startswith("transformer_blocks.0.")}
    single = {n: s for n, s in linears.items() if n.startswith("single_transformer_blocks.0.")}
    rows = ["| rank | merge one dual block s | one single block s | 20 + 40 blocks, estimated s |", "|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for rank in ranks:
        per = {}
        for kind, layers in (("double", double), ("single", single)):
            weights = {n: torch.randn(o, i, generator=g).to(torch.bfloat16) for n, (i, o) in layers.items()}
            factors = {n: (torch.randn(rank, i, generator=g).to(torch.bfloat16),
                           torch.randn(o, rank, generator=g).to(torch.bfloat16)) for n, (i, o) in layers.items()}

            def merge(weights=weights, factors=factors):
                for n, w in weights.items():
                    down, up = factors[n]
                    w.copy_(w.float().add_(up.float() @ down.float(), alpha=0.8))

            per[kind], _ = timed(merge, 2)
            del weights, factors
        total = config["num_layers"] * per["double"] + config["num_single_layers"] * per["single"]
        rows.append(f"| {rank} | {per['double']:.2f} | {per['single']:.2f} | {total:.0f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="32,128")
    ap.add_argument("--scratch", default=None, help="folder for the real-size LoRA files (up to ~1.4 GB)")
    ap.add_argument("--models", default=None, help="a model folder (default: a tiny one built here)")
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        scratch = Path(scratch)
        models = Path(args.models) if args.models else make_tiny_model(scratch / "tiny")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
        print("\n".join(tiny_part(models, ranks, scratch)) + "\n")
        if not args.skip_real:
            print("\n".join(real_part(ranks, scratch)) + "\n")
            print("Merging into the weights instead (CPU, bf16 weights, float32 product):\n")
            print("\n".join(merge_part(ranks)))


if __name__ == "__main__":
    main()
