"""Write a random-weight FramePackI2V_HY-sized transformer checkpoint (bf16, ~5 GB shards, ~26 GB).

    python benchmarks/make_fullsize_checkpoint.py DIR [--blocks-dual 20 --blocks-single 40]

The model is built on the ``meta`` device and materialised one tensor at a time straight into the
shard being written, so RAM stays at a few hundred MB. Weights are N(0, 0.02) (norm scales 1), which
keeps a forward finite. If the disk has less than ~60 GB free (checkpoint + the "disk" storage's
fp8 copy + headroom) the block counts are reduced to fit and ``benchmark.json`` records the full
counts, so bench_fullsize.py can extrapolate per block. The output is not a usable model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framepack_local.weights.model_folder import FRAMEPACK_TRANSFORMER_CONFIG  # noqa: E402

logger = logging.getLogger("make_fullsize_checkpoint")

FULL_CONFIG = FRAMEPACK_TRANSFORMER_CONFIG  # lllyasviel/FramePackI2V_HY transformer/config.json
SHARD_BYTES = 5_000_000_000
MIN_FREE = 60e9
# An fp8 copy is ~0.65 of the bf16 size; keep a few GB for everyone else on the disk.
CACHE_RATIO, HEADROOM = 0.65, 5e9


def _bf16_bytes(config: dict) -> tuple[int, list[int]]:
    from framepack_local.weights import storage

    blocks = storage.transformer_block_bytes(config, "bf16")
    return storage.transformer_nonblock_bytes(config, "bf16") + sum(blocks), blocks


def _fit_blocks(config: dict, free: float) -> dict:
    """Fewest-change block counts (same dual:single ratio) whose checkpoint + fp8 copy fit ``free``."""
    total, blocks = _bf16_bytes(config)
    budget = (free - HEADROOM) / (1 + CACHE_RATIO)
    dual, single = config["num_layers"], config["num_single_layers"]
    per_dual, per_single = blocks[0], blocks[-1]
    other = total - dual * per_dual - single * per_single
    scale = max(0.0, (budget - other) / (dual * per_dual + single * per_single))
    if scale < 1:
        dual, single = max(1, math.floor(dual * scale)), max(1, math.floor(single * scale))
    return {**config, "num_layers": dual, "num_single_layers": single}


def _value(name: str, shape: tuple[int, ...], std: float, seed: int):
    import torch

    if len(shape) == 1 and name.endswith(".weight") and "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)  # RMSNorm / LayerNorm scales
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)


def write_checkpoint(out: Path, config: dict, std: float = 0.02, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    import torch

    from framepack_local.weights import casting, safetensors_io

    meta = casting.build_meta_model(config)
    # Non-block tensors first, then block by block (the order of the real checkpoint's index).
    names = [(n, tuple(t.shape)) for n, t in meta.named_parameters() if not n.startswith(casting.BLOCK_LISTS)]
    names += [(n, tuple(t.shape)) for n, t in meta.named_parameters() if n.startswith(casting.BLOCK_LISTS)]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    del meta

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    started = time.perf_counter()
    for k, shard in enumerate(shards):
        file_name = f"diffusion_pytorch_model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        specs = [(n, torch.bfloat16, s) for n, s in shard]
        shapes = dict(shard)
        total += safetensors_io.write_safetensors_streaming(tmp / file_name, specs, lambda n: _value(n, shapes[n], std, seed))
        weight_map.update({n: file_name for n, _ in shard})
        logger.info("wrote %s (%d tensors, %.1f GB so far, %.0f s)", file_name, len(shard), total / 1e9,
                    time.perf_counter() - started)
    (tmp / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(
        {"_class_name": "HunyuanVideoFramepackTransformer3DModel", "_diffusers_version": "0.42.1", **config}, indent=2))
    (tmp / "benchmark.json").write_text(json.dumps({
        "random_weights_std": std, "seed": seed,
        "full_num_layers": FULL_CONFIG["num_layers"], "full_num_single_layers": FULL_CONFIG["num_single_layers"],
        "num_layers": config["num_layers"], "num_single_layers": config["num_single_layers"],
    }, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="output folder (the transformer folder itself)")
    parser.add_argument("--blocks-dual", type=int, default=None, help="dual-stream blocks (full: 20)")
    parser.add_argument("--blocks-single", type=int, default=None, help="single-stream blocks (full: 40)")
    parser.add_argument("--std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1e9)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    config = dict(FULL_CONFIG)
    if args.blocks_dual is not None:
        config["num_layers"] = args.blocks_dual
    if args.blocks_single is not None:
        config["num_single_layers"] = args.blocks_single
    probe = args.dir.resolve().parent
    probe.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(probe).free
    needed = _bf16_bytes(config)[0]
    print(f"free disk at {probe}: {free / 1e9:.1f} GB; requested checkpoint: {needed / 1e9:.1f} GB bf16 "
          f"({config['num_layers']} dual + {config['num_single_layers']} single blocks)")
    if free < max(MIN_FREE, needed * (1 + CACHE_RATIO) + HEADROOM):
        config = _fit_blocks(config, free)
        needed = _bf16_bytes(config)[0]
        print(f"NOTE: not enough free disk for the full checkpoint and its fp8 copy; writing "
              f"{config['num_layers']} dual + {config['num_single_layers']} single blocks ({needed / 1e9:.1f} GB); "
              f"bench_fullsize.py extrapolates per block to 20 + 40.")
    started = time.perf_counter()
    out = write_checkpoint(args.dir, config, std=args.std, seed=args.seed, shard_bytes=int(args.shard_gb * 1e9))
    print(f"wrote {out} ({needed / 1e9:.1f} GB) in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
