"""GPU acceptance run: the paths a small card depends on, on any lent CUDA machine, in one command.

    python benchmarks/gpu_acceptance.py [--work DIR] [--out FILE] [--quick]
    python benchmarks/gpu_acceptance.py --dry-run      # the same code on the CPU with the tiny model (CI)

Target: an H100/H200-class machine (16 cores, >= 60 GB free disk under --work), under 8 minutes.
1. Builds (or reuses) a random-weight checkpoint of the real 13B transformer config under --work
   (benchmarks/make_fullsize_checkpoint.py) and runs the streaming self-test (memory/streaming_selftest.py).
2. For emulated cards of 6, 8, 12 and 24 GB (torch.cuda.set_per_process_memory_fraction, the plan
   given the same VRAM and a matching RAM size): the plan chosen, one section at the 640 bucket
   (window 9, STEPS steps), peak allocated / reserved VRAM against the plan's prediction, seconds per
   step, the streamed/resident ratio against the same storage fully resident, and whether the
   streamed output equals the resident one bit for bit (the self-test at full size).
3. Tiled VAE decode of one section at 640 with a random-weight HunyuanVideo VAE: peak VRAM, seconds.
4. A LLaMA-8B-config random-weight text encoder in int8 and int4 (bitsandbytes) and disk-streamed
   fp16: peak VRAM, seconds per prompt.
Prints one table and writes a JSON file. ``--quick``: the 8 GB card, 3 steps, int8 only. Exit 1 when
a streamed output differs from its resident one or a measured part failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("gpu_acceptance")
GB = 1024**3
CARDS = ((6, 16), (8, 32), (12, 32), (24, 64))  # (VRAM GB, RAM GB) of the emulated machines
QUICK_CARDS = ((8, 32),)
STEPS, QUICK_STEPS = 4, 3
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_theta=500000.0)
PROMPT_TOKENS = 256  # the prompt template (95) + a long prompt; the engine pads to the real length


class Bench:
    def __init__(self, args) -> None:
        import torch

        self.args, self.torch = args, torch
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)

    # ---- measuring

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peaks(self) -> None:
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peaks(self) -> dict:
        if not self.cuda:
            return {"peak_allocated": None, "peak_reserved": None}
        return {"peak_allocated": self.torch.cuda.max_memory_allocated(),
                "peak_reserved": self.torch.cuda.max_memory_reserved()}

    @contextlib.contextmanager
    def card(self, vram_gb: int):
        """Let torch's allocator use only what a card of ``vram_gb`` leaves next to the CUDA context."""
        from framepack_local.memory.plan import CUDA_CONTEXT_BYTES

        if self.cuda:
            total = self.torch.cuda.get_device_properties(0).total_memory
            self.torch.cuda.set_per_process_memory_fraction(min(1.0, (vram_gb * GB - CUDA_CONTEXT_BYTES) / total))
        self.reset_peaks()
        try:
            yield
        finally:
            if self.cuda:
                self.torch.cuda.set_per_process_memory_fraction(1.0)
                self.torch.cuda.empty_cache()

    def timed(self, fn, repeats: int) -> tuple[object, list[float]]:
        """First result and the seconds of each call."""
        first, seconds = None, []
        for i in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            seconds.append(time.perf_counter() - t0)
            if i == 0:
                first = out
        return first, seconds

    # ---- the model folder

    def models_root(self) -> Path:
        if self.dry:
            if self.args.models:
                return Path(self.args.models)
            from framepack_local.weights.tiny import make_tiny_model

            root = self.work / "tiny"
            return root if (root / "transformer" / "config.json").exists() else make_tiny_model(root)
        return self.work / "fullsize"

    def transformer_folder(self, root: Path) -> Path:
        folder = root / "transformer"
        if self.dry:
            return folder
        from make_fullsize_checkpoint import FULL_CONFIG, write_checkpoint

        marker = folder / "benchmark.json"
        if marker.exists() and json.loads(marker.read_text()).get("num_layers") == FULL_CONFIG["num_layers"]:
            logger.info("reusing %s", folder)
            return folder
        logger.info("writing the random 13B checkpoint to %s", folder)
        return write_checkpoint(folder, dict(FULL_CONFIG))

    # ---- 1-2. streaming on emulated cards

    def selftest(self, folder: Path):
        from framepack_local.memory import streaming_selftest as st

        config = None
        if self.dry:
            config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                      if not k.startswith("_")}
        cache = self.work / ".cache"
        if self.args.fresh_selftest:
            (cache / st.CACHE_FILE).unlink(missing_ok=True)
        return st.streaming_verdict(self.device, cache, config=config)

    def section_inputs(self, config: dict):
        """One step's transformer inputs: the 640 bucket, window 9 (dry run: the self-test's small ones)."""
        if self.dry:
            from framepack_local.memory.streaming_selftest import selftest_inputs

            return selftest_inputs(config, self.device, self.dtype, h=4, w=4), 64, 64, 1
        from bench_fullsize import _inputs

        inputs, (height, width, _, _) = _inputs(config, (640, 608), 640, 9, self.dtype)
        moved = {k: v.to(self.device) if self.torch.is_tensor(v) else v for k, v in inputs.items()}
        return moved, height, width, 9

    def transformer_rows(self, root: Path, folder: Path, verdict) -> list[dict]:
        from framepack_local.memory.plan import JobShape, ModelSizes, SystemFacts, plan
        from framepack_local.memory.probe import model_sizes_from_folder, transformer_size_from_folder
        from framepack_local.memory.streaming_selftest import streaming_decision
        from framepack_local.weights.storage import load_transformer
        from framepack_local.weights.streaming import apply_streaming, remove_streaming, unload

        config = json.loads((folder / "config.json").read_text())
        inputs, height, width, window = self.section_inputs(config)
        shape = JobShape(height=height, width=width, window=window)
        sizes = (model_sizes_from_folder(root, "inverted") if self.dry
                 else ModelSizes(transformer_size_from_folder(folder)))
        n_blocks = len(sizes.transformer.blocks)
        steps = 2 if self.dry else QUICK_STEPS if self.args.quick else STEPS
        disk_free = shutil.disk_usage(self.work).free
        plans = []
        for vram, ram in (QUICK_CARDS if self.args.quick else CARDS):
            facts = SystemFacts(cuda=True, gpu_name=f"emulated {vram} GB", vram_total=vram * GB,
                                vram_free=vram * GB - int(0.3 * GB), ram_total=ram * GB,
                                ram_available=int(0.8 * ram * GB), disk_free=disk_free, bitsandbytes=True)
            plans.append((vram, ram, streaming_decision(plan(facts, sizes, shape), verdict)[0]))

        def forward(model):
            with self.torch.no_grad():
                return model(**inputs)[0]

        rows = []
        for storage in dict.fromkeys(p.transformer_storage for _, _, p in plans):
            model = load_transformer(folder, storage, self.dtype, cache_dir=self.work / ".cache",
                                     keep_mapped=self.cuda)
            outputs = []
            # Streamed first: the first card streams from the storage's own host tensors (memory maps
            # for "disk"); remove_streaming leaves RAM copies of what was on the card.
            for vram, ram, p in plans:
                if p.transformer_storage != storage:
                    continue
                # The tiny model fits every card: stream all but one block so the dry run streams too.
                resident = min(p.resident_blocks, n_blocks - 1) if self.dry else p.resident_blocks
                sections = next(stage for stage in p.stages if stage.stage == "sections")
                row = {"card_gb": vram, "ram_gb": ram, "storage": storage, "resident_blocks": resident,
                       "streamed_blocks": n_blocks - resident, "copies": p.stream_copies,
                       "text_encoder": p.text_encoder_mode, "predicted_vram": sections.vram,
                       "predicted_pinned": p.stream_buffers.pinned_bytes if p.stream_buffers else 0}
                out = None
                try:
                    with self.card(vram):
                        summary = apply_streaming(model, self.device, resident_blocks=resident,
                                                  use_stream=p.stream_copies == "overlapped")
                        out, seconds = self.timed(lambda m=model: forward(m).cpu(), steps)
                        row.update(self.peaks())
                    row.update(s_per_step=_median(seconds[1:] or seconds), pinned=summary["pinned_bytes"],
                               device_buffers=summary["device_buffer_bytes"])
                    if row["peak_reserved"] is not None:
                        row["reserved_over_predicted"] = round(row["peak_reserved"] / max(sections.vram, 1), 3)
                except Exception as exc:  # noqa: BLE001 - an out-of-memory is a finding, not a crash
                    row.update(error=f"{type(exc).__name__}: {str(exc)[:200]}", equal=False)
                    logger.exception("card %d GB failed", vram)
                finally:
                    remove_streaming(model)
                rows.append(row)
                outputs.append((row, out))
            apply_streaming(model, self.device, resident_blocks=n_blocks)  # the same storage, all resident
            reference, resident_s = self.timed(lambda m=model: forward(m).cpu(), steps)
            remove_streaming(model)
            for row, out in outputs:
                row["resident_s_per_step"] = _median(resident_s[1:] or resident_s)
                if out is not None:
                    row.update(equal=bool(self.torch.equal(out, reference)),
                               max_abs_diff=(out.float() - reference.float()).abs().max().item(),
                               streamed_over_resident=round(row["s_per_step"] / max(row["resident_s_per_step"],
                                                                                    1e-9), 2))
                logger.info("card %s", row)
            unload(model)
            del model, reference
        return rows

    # ---- 3. VAE

    def vae_row(self, root: Path) -> dict:
        from framepack_local.engine.encode import vae_decode
        from framepack_local.memory.plan import TILED_DECODE_BYTES
        from framepack_local.weights.casting import module_bytes

        torch = self.torch
        if self.dry:
            from framepack_local.weights.model_folder import load_part

            vae = load_part(root, "vae", device="cpu", dtype=torch.float32)
            latents = torch.randn(1, 16, 3, 8, 8)
        else:
            from diffusers import AutoencoderKLHunyuanVideo

            torch.manual_seed(0)
            vae = AutoencoderKLHunyuanVideo().to(self.device, torch.float16).eval()  # real config, random init
            latents = torch.randn(1, 16, 2 * 9 + 1, 640 // 8, 608 // 8)  # one section with its neighbour
        vae.enable_tiling()
        vae.use_framewise_decoding = self.cuda
        row = {"latents": list(latents.shape), "predicted_vram": module_bytes(vae) + TILED_DECODE_BYTES}
        self.reset_peaks()
        try:
            with torch.no_grad():
                frames, seconds = self.timed(lambda v=vae: vae_decode(v, latents), 1)
            row.update(self.peaks(), seconds=round(seconds[0], 2), frames=int(frames.shape[0]))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            logger.exception("VAE decode failed")
        del vae
        return row

    # ---- 4. text encoder

    def llama_root(self, root: Path) -> Path:
        if self.dry:
            return root
        llama = self.work / "llama8b"
        folder = llama / "text_encoder"
        if not (folder / "model.safetensors.index.json").exists():
            write_random_llama(folder, LLAMA_8B, device="cuda")
        return llama

    def text_rows(self, root: Path, verdict) -> list[dict]:
        from framepack_local.memory.residency import _load_llama_quantized, load_llama_streamed

        torch = self.torch
        llama_root = self.llama_root(root)
        vocab = json.loads((llama_root / "text_encoder" / "config.json").read_text())["vocab_size"]
        ids = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
        modes = ("int8",) if self.args.quick else ("int8", "int4", "disk-fp16")
        rows = []
        for mode in modes:
            row = {"mode": mode}
            if mode != "disk-fp16" and not self.cuda:
                row["skipped"] = "bitsandbytes needs a CUDA GPU"
                rows.append(row)
                continue
            self.reset_peaks()
            try:
                t0 = time.perf_counter()
                model = (load_llama_streamed(llama_root, self.device, overlap=bool(verdict and verdict.passed))
                         if mode == "disk-fp16" else _load_llama_quantized(llama_root, 8 if mode == "int8" else 4))
                row["load_s"] = round(time.perf_counter() - t0, 1)
                def encode(model=model):
                    with torch.no_grad():
                        return model(input_ids=ids.to(self.device), output_hidden_states=True).hidden_states[-3]

                out, seconds = self.timed(encode, 2 if self.dry else 3)
                row.update(self.peaks(), s_per_prompt=_median(seconds[1:]), finite=bool(torch.isfinite(out).all()))
                del model
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                logger.exception("text encoder %s failed", mode)
            rows.append(row)
            logger.info("text encoder %s", row)
        return rows


def write_random_llama(folder: Path, config: dict, seed: int = 0, device: str = "cpu") -> Path:
    """A random-weight fp16 LlamaModel checkpoint of ``config``, one layer per shard in RAM at a time
    (numbers drawn on ``device``: a GPU draws the 8 billion in seconds, one CPU thread takes minutes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(**config)
    cfg.save_pretrained(tmp)
    with torch.device("meta"):
        meta = LlamaModel(cfg)
    groups: dict[str, list] = {}
    for name, t in meta.named_parameters():
        key = ".".join(name.split(".")[:2]) if name.startswith("layers.") else "other"
        groups.setdefault(key, []).append((name, tuple(t.shape)))
    g = torch.Generator(device).manual_seed(seed)
    weight_map = {}
    for k, (key, named) in enumerate(groups.items()):
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g, device=device) * 0.02
                       ).to(torch.float16).cpu() for n, s in named}, str(tmp / shard))
        weight_map.update({n: shard for n, _ in named})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2], 3) if ordered else 0.0


def _gb(n) -> str:
    return "-" if n is None else f"{n / GB:.2f}"


def table(result: dict) -> str:
    lines = [f"GPU acceptance ({'dry run on the CPU' if result['dry_run'] else result['machine']['gpu']}), "
             f"{result['wall_s']:.0f} s; streaming self-test: "
             f"{'passed' if result['selftest']['passed'] else 'FAILED'} ({result['selftest']['seconds']} s)",
             f"{'card':>5s} {'RAM':>4s} {'storage':7s} {'res/str':>7s} {'copies':11s} {'plan GB':>7s} {'alloc':>6s} "
             f"{'reserv':>6s} {'s/step':>6s} {'x res':>5s} equal"]
    for r in result["transformer"]:
        lines.append(f"{r['card_gb']:>4d}G {r['ram_gb']:>3d}G {r['storage']:7s} "
                     f"{r['resident_blocks']:>3d}/{r['streamed_blocks']:<3d} {r['copies']:11s} "
                     f"{_gb(r['predicted_vram']):>7s} {_gb(r.get('peak_allocated')):>6s} "
                     f"{_gb(r.get('peak_reserved')):>6s} {r.get('s_per_step', 0):>6.2f} "
                     f"{r.get('streamed_over_resident', 0):>5.2f} {r.get('equal')}" + (f"  {r['error']}" if 'error' in r
                                                                                      else ""))
    v = result["vae"]
    lines.append(f"VAE tiled decode {v['latents']}: {v.get('seconds', '-')} s, peak {_gb(v.get('peak_allocated'))} "
                 f"allocated / {_gb(v.get('peak_reserved'))} reserved GB, plan {_gb(v['predicted_vram'])} GB"
                 + (f"  {v['error']}" if "error" in v else ""))
    for r in result["text_encoder"]:
        detail = r.get("skipped") or r.get("error") or (f"{r['s_per_prompt']} s per prompt, load {r['load_s']} s, "
                                                        f"peak {_gb(r.get('peak_allocated'))} GB")
        lines.append(f"text encoder {r['mode']:9s}: {detail}")
    lines.append("verdict: " + ("PASS" if result["ok"] else "FAIL"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="gpu-acceptance-work", help="checkpoints and caches (>= 60 GB free)")
    parser.add_argument("--out", default=None, help="JSON result (default: WORK/gpu_acceptance.json)")
    parser.add_argument("--quick", action="store_true", help="the 8 GB card, 3 steps, int8 only")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU with the tiny model")
    parser.add_argument("--models", default=None, help="dry run: an existing tiny model folder")
    parser.add_argument("--fresh-selftest", action="store_true", help="ignore a cached self-test verdict")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --dry-run to check the script on the CPU")
    bench = Bench(args)
    root = bench.models_root()
    folder = bench.transformer_folder(root)
    verdict = bench.selftest(folder)
    result = {
        "dry_run": args.dry_run, "quick": args.quick,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name() if bench.cuda else None,
                    "vram_total": torch.cuda.get_device_properties(0).total_memory if bench.cuda else None},
        "selftest": verdict.record(),
        "transformer": bench.transformer_rows(root, folder, verdict),
        "vae": bench.vae_row(root),
        "text_encoder": bench.text_rows(root, verdict),
    }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["ok"] = (verdict.passed and all(r.get("equal") for r in result["transformer"])
                    and "error" not in result["vae"] and not any("error" in r for r in result["text_encoder"]))
    out = Path(args.out) if args.out else bench.work / "gpu_acceptance.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"written: {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
