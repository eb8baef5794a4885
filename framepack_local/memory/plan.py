"""Memory: probe the machine, then plan (a pure function) where every model lives in every stage.

Stages never need more than one big model at once (DESIGN.md §4): text -> image -> sections -> decode.
The plan decides, from probed facts and model sizes only:
  - the transformer's storage: "bf16" in RAM, "fp8" in RAM (half the RAM and half the PCIe traffic,
    bf16 compute per layer), or "disk" (fp8 weights memory-mapped from a cache file, so they never
    count as anonymous RAM);
  - how many transformer blocks stay resident on the GPU; the rest stream block by block with the
    next block's copy overlapping the current block's compute;
  - how the 8B LLaMA text encoder runs (fp16 on the GPU, 8-bit or 4-bit with bitsandbytes, or
    memory-mapped and streamed layer by layer) — it is loaded for the text stage and released before the transformer is needed;
  - whether the VAE decodes tiled.
It predicts peak VRAM and peak RAM per stage. Everything here is pure and tested with injected facts,
including on the real 13B configuration built on the meta device; `memory.probe` is what looks at
the machine and the model folder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

GB = 1024**3
PROFILES = ("auto", "bf16", "fp8", "disk")

# Real component sizes at their shipped precision (bytes), for planning before a download and in tests.
REAL_SIZES_BYTES = {
    "text_encoder": 15_010_000_000,  # LLaMA-3 8B, fp16
    "text_encoder_2": 246_000_000,  # CLIP-L text, fp16
    "image_encoder": 857_000_000,  # SigLIP so400m, fp16 (from flux_redux_bfl)
    "vae": 493_000_000,  # HunyuanVideo 3D VAE, fp16/fp32 mix
}

# Things the plan cannot see in tensor sizes.
CUDA_CONTEXT_BYTES = int(0.45 * GB)  # CUDA context + cuBLAS workspaces; lives on the card, outside torch
PROCESS_RAM_BYTES = int(2.5 * GB)  # python + torch + CUDA libraries + gradio, measured order of magnitude
FRAGMENTATION = 1.10  # caching-allocator slack over the sum of live tensors
TILED_DECODE_BYTES = int(1.6 * GB)  # HunyuanVideo VAE, 256 px tiles x (16+1) frames, fp16 (measured order)
# Whole-frame decode: the last up-block runs 128 channels at full resolution for every output frame,
# fp16, with about three such tensors alive at once: 128 x 2 x 3 bytes per output pixel-frame.
UNTILED_DECODE_BYTES_PER_PIXEL_FRAME = 768
# weights/prefetch.py: two slots; each tensor of a block starts 512-byte aligned (a 13B block has at
# most 32 tensors, 16 KB of padding): 64 KB per slot covers it with room for adapter weights.
STREAM_SLOTS = 2
SLOT_PADDING_BYTES = 64 * 1024
COPY_MODES = ("overlapped", "synchronous")


@dataclass(frozen=True)
class SystemFacts:
    cuda: bool
    gpu_name: str | None
    vram_total: int
    vram_free: int
    ram_total: int
    ram_available: int
    disk_free: int
    bitsandbytes: bool = False


@dataclass(frozen=True)
class TransformerSize:
    """Bytes of the transformer per storage; fp8 follows diffusers' layerwise-casting rule (weights/casting.py):
    Linear/Conv weights in fp8, the AdaLN modulation linears, embedders and norms in bf16."""

    blocks: tuple[int, ...]  # each dual/single block at bf16, in execution order
    other: int  # embedders, refiner, norms, projections at bf16 (always on the GPU when streaming)
    blocks_fp8: tuple[int, ...]
    other_fp8: int
    hidden: int = 3072  # inner dim, for the activation estimate

    @property
    def total(self) -> int:
        return sum(self.blocks) + self.other

    def _blocks(self, storage: str) -> tuple[int, ...]:
        return self.blocks_fp8 if storage in ("fp8", "disk") else self.blocks

    def block_bytes(self, storage: str) -> int:
        """Bytes of the largest block in a storage precision."""
        return max(self._blocks(storage), default=0)

    def blocks_bytes(self, storage: str) -> int:
        return sum(self._blocks(storage))

    def other_bytes(self, storage: str) -> int:
        return self.other_fp8 if storage in ("fp8", "disk") else self.other


@dataclass(frozen=True)
class ModelSizes:
    transformer: TransformerSize
    text_encoder: int = REAL_SIZES_BYTES["text_encoder"]
    text_encoder_2: int = REAL_SIZES_BYTES["text_encoder_2"]
    image_encoder: int = REAL_SIZES_BYTES["image_encoder"]
    vae: int = REAL_SIZES_BYTES["vae"]


@dataclass(frozen=True)
class JobShape:
    height: int = 640
    width: int = 608
    window: int = 9
    text_tokens: int = 512
    image_tokens: int = 729
    history: tuple[int, int, int] = (1, 2, 16)


@dataclass(frozen=True)
class LoraCost:
    """What a job's LoRAs weigh (weights/lora.py adapter_bytes): the files as read, the combined factors in
    the compute dtype, and the largest layer's factors (what a use copies when they stay in RAM)."""

    file_bytes: int = 0
    adapter_bytes: int = 0
    largest_layer_bytes: int = 0


@dataclass(frozen=True)
class Placement:
    model: str
    where: str  # "gpu", "cpu", "stream" (cpu -> gpu block by block), "disk" (mmap -> gpu)
    storage: str  # "bf16", "fp16", "fp8", "int8", "int4", "fp32"


@dataclass(frozen=True)
class StagePlan:
    stage: str
    placements: tuple[Placement, ...]
    vram: int  # predicted peak bytes on the GPU (0 without CUDA)
    ram: int  # predicted peak anonymous RAM of the process


@dataclass(frozen=True)
class MemoryPlan:
    profile: str
    device: str  # "cuda" or "cpu"
    transformer_storage: str  # "bf16", "fp8", "disk"
    resident_blocks: int
    streamed_blocks: int
    text_encoder_mode: str  # "gpu-fp16", "gpu-int8", "gpu-int4", "disk-fp16" (mmap + streamed), "cpu"
    keep_text_encoder: bool  # keep LLaMA in RAM between jobs (only with plenty of RAM)
    vae_tiling: bool
    activation_bytes: int
    stages: tuple[StagePlan, ...]
    notes: tuple[str, ...] = field(default=())
    lora_where: str = "none"  # "gpu" (factors kept on the card), "cpu" (RAM, copied per use) or "none"
    lora_bytes: int = 0
    stream_copies: str = "overlapped"  # COPY_MODES: "synchronous" after a failed streaming self-test
    stream_buffers: "StreamBuffers | None" = None  # what the prefetcher allocates (None: nothing streams)

    @property
    def peak_vram(self) -> int:
        return max(s.vram for s in self.stages)

    @property
    def peak_ram(self) -> int:
        return max(s.ram for s in self.stages)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_vram"], d["peak_ram"] = self.peak_vram, self.peak_ram
        return d

    def table(self) -> str:
        """One readable table for logs and the job record."""
        gb = lambda b: f"{b / GB:5.1f} GB"  # noqa: E731
        lines = [f"memory plan ({self.profile}, {self.device}): transformer {self.transformer_storage}, "
                 f"{self.resident_blocks} blocks resident / {self.streamed_blocks} streamed"
                 + (f" ({self.stream_copies} copies)" if self.streamed_blocks and self.device == "cuda" else "")
                 + ", "
                 f"text encoder {self.text_encoder_mode}, VAE {'tiled' if self.vae_tiling else 'whole frames'}",
                 f"{'stage':9s} {'peak VRAM':>9s} {'peak RAM':>9s}  placement"]
        for s in self.stages:
            where = ", ".join(f"{p.model}@{p.where}/{p.storage}" for p in s.placements)
            lines.append(f"{s.stage:9s} {gb(s.vram):>9s} {gb(s.ram):>9s}  {where}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class StreamBuffers:
    """What the block prefetcher holds while blocks stream: slots on the card, pinned staging in RAM."""

    slots: int
    slot_bytes: int
    device_bytes: int  # VRAM: the slots the streamed blocks are computed from
    pinned_bytes: int  # RAM, page-locked: one staging buffer per slot


def stream_buffers(block_bytes: int, streamed: int) -> StreamBuffers | None:
    """Pure: the buffers weights/prefetch.BlockPrefetcher allocates for ``streamed`` blocks of at most
    ``block_bytes`` each (None when nothing streams). Allocated once; the same in both copy modes."""
    if streamed <= 0:
        return None
    slots = min(STREAM_SLOTS, streamed)
    slot = block_bytes + SLOT_PADDING_BYTES
    return StreamBuffers(slots, slot, slots * slot, slots * slot)


def with_copy_mode(p: "MemoryPlan", mode: str, reason: str | None = None) -> "MemoryPlan":
    """Pure: the plan with its streamed blocks copied in ``mode`` (COPY_MODES), ``reason`` as a note."""
    import dataclasses

    if mode not in COPY_MODES:
        raise ValueError(f"unknown copy mode {mode!r}")
    notes = p.notes + ((reason,) if reason else ())
    return dataclasses.replace(p, stream_copies=mode, notes=notes)


# ---- activations


def job_tokens(shape: JobShape) -> int:
    """Tokens of one transformer call: the noisy window (patch 1x2x2), the clean 1x frames (start + 1x
    history), the 2x history (kernel 2x4x4) and 4x history (kernel 4x8x8), text and SigLIP tokens."""
    lh, lw = shape.height // 8, shape.width // 8
    per_frame = (lh // 2) * (lw // 2)
    h1, h2, h4 = shape.history
    window = shape.window * per_frame
    clean = (1 + h1) * per_frame
    two_x = math.ceil(h2 / 2) * math.ceil(lh / 4) * math.ceil(lw / 4)
    four_x = math.ceil(h4 / 4) * math.ceil(lh / 8) * math.ceil(lw / 8)
    return window + clean + two_x + four_x + shape.text_tokens + shape.image_tokens


def estimate_step_seconds(p: "MemoryPlan", size: TransformerSize, shape: JobShape, tflops: float,
                          h2d_gb_s: float) -> dict:
    """Pure, an estimate: seconds per sampling step from a measured bf16 matmul rate and pinned
    host-to-device bandwidth. Compute: 2 FLOPs per weight per token in every block (bf16 weights are
    2 bytes) plus attention (QK^T and AV: 4 x tokens^2 x hidden per block); copies: the streamed
    blocks in the plan's storage, overlapped with compute or after it (synchronous copies)."""
    tokens = job_tokens(shape)
    n_blocks = len(size.blocks)
    flops = 2 * tokens * size.blocks_bytes("bf16") / 2 + 4 * tokens**2 * size.hidden * n_blocks
    compute = flops / max(tflops, 1e-6) / 1e12
    streamed_bytes = sum(size._blocks(p.transformer_storage)[p.resident_blocks:]) if p.streamed_blocks else 0
    copy = streamed_bytes / max(h2d_gb_s, 1e-6) / 1e9
    step = max(compute, copy) if p.stream_copies == "overlapped" else compute + copy
    return {"tokens": tokens, "compute_s": round(compute, 2), "copy_s": round(copy, 2), "step_s": round(step, 2)}


def activation_bytes(shape: JobShape, hidden: int = 3072, dtype_bytes: int = 2) -> int:
    """Peak activation bytes of one transformer block call, with a flash/memory-efficient attention kernel.

    Tokens: the noisy window (patch 1x2x2), the clean 1x frames (start + 1x history, same patch),
    the 2x history (kernel 2x4x4) and 4x history (kernel 4x8x8), plus text and SigLIP image tokens.
    A single-stream block is the largest: live at its peak are the input and the normed input (2),
    q, k, v (3), the attention output (1), the MLP up-projection and its GELU (2 x 4), and the
    concatenated [attention, MLP] output (5): 19 x tokens x hidden. RoPE tables (fp32 cos+sin of
    the 128-wide head) and the modulation vectors are small next to that. Attention itself is
    O(tokens) with flash / memory-efficient SDPA, which CUDA uses for bf16.
    """
    tokens = job_tokens(shape)
    block_peak = 19 * tokens * hidden * dtype_bytes
    rope = tokens * 128 * 2 * 4
    return block_peak + rope


# ---- the plan (pure)


def _transformer_ram(size: TransformerSize, storage: str, mapped: bool = False) -> int:
    """Anonymous RAM the transformer holds. `mapped` (GPU compute): fp8 keeps its uncast bf16 tensors
    as views of the checkpoint's file map (weights.storage.load_transformer keep_mapped), so only the fp8
    weights are owned: with C the bf16 bytes of the cast tensors, bf16 total - fp8 total = C/2."""
    if storage == "disk":
        return 0  # memory-mapped fp8 file: page cache, not anonymous memory
    fp8_total = size.blocks_bytes("fp8") + size.other_bytes("fp8")
    if storage == "fp8" and mapped:
        return size.total - fp8_total
    return size.blocks_bytes(storage) + size.other_bytes(storage)


def plan(facts: SystemFacts, sizes: ModelSizes, shape: JobShape, profile: str = "auto",
         keep_free_gb: float | None = None, lora: LoraCost | None = None) -> MemoryPlan:
    """Choose placements so every stage's predicted peak stays under the facts (see module docstring)."""
    base = _plan_models(facts, sizes, shape, profile, keep_free_gb)
    keep_free = int((keep_free_gb if keep_free_gb is not None else 0.0) * GB)
    vram_budget = min(facts.vram_total - CUDA_CONTEXT_BYTES, facts.vram_free) - keep_free
    return add_lora_cost(base, lora, vram_budget)


def add_lora_cost(plan: MemoryPlan, lora: LoraCost | None, vram_budget: int) -> MemoryPlan:
    """The plan with a job's LoRAs counted in RAM and VRAM, per stage.

    LoRAs never change the transformer's storage or its resident blocks: the loaded transformer is kept
    between jobs by exactly those, so switching LoRAs never reloads it. The factors go on the GPU when
    the card has room for them beside the sections' and the decode's peaks; otherwise they stay in RAM
    (pinned) and each layer's pair is copied when used (a few MB per layer, beside a block's ~400 MB).
    The files as read are held through the text and image stages; the combined factors replace them
    once the adapters are attached, before the first section.
    """
    if lora is None or not (lora.file_bytes or lora.adapter_bytes):
        return plan
    cuda = plan.device == "cuda"
    later = [s.vram for s in plan.stages if s.stage in ("sections", "decode")]
    on_gpu = cuda and max(later, default=0) + lora.adapter_bytes * FRAGMENTATION <= vram_budget
    stages = []
    for s in plan.stages:
        ram, vram = s.ram, s.vram
        if s.stage in ("text", "image"):
            ram += lora.file_bytes
        else:
            ram += 0 if on_gpu else lora.adapter_bytes
            if on_gpu:
                vram += int(lora.adapter_bytes * FRAGMENTATION)
            elif cuda and s.stage == "sections":
                vram += 2 * lora.largest_layer_bytes  # the pair in use and the next one's copy
        stages.append(replace(s, ram=ram, vram=vram))
    where = "gpu" if on_gpu else "cpu"
    note = (f"LoRA factors: {lora.adapter_bytes / 1024**2:.0f} MB "
            f"{'on the GPU' if on_gpu else 'in RAM' + (', copied to the GPU per layer' if cuda else '')}")
    return replace(plan, stages=tuple(stages), lora_where=where, lora_bytes=lora.adapter_bytes,
                   notes=plan.notes + (note,))


def _plan_models(facts: SystemFacts, sizes: ModelSizes, shape: JobShape, profile: str,
                 keep_free_gb: float | None) -> MemoryPlan:
    if profile not in PROFILES:
        raise ValueError(f"unknown memory profile {profile!r}")
    notes: list[str] = []
    tsize = sizes.transformer
    small_ram = sizes.text_encoder_2 + sizes.image_encoder + sizes.vae  # always held in RAM, moved per stage
    act = activation_bytes(shape, hidden=tsize.hidden)
    ram_budget = facts.ram_available - PROCESS_RAM_BYTES - small_ram

    # Transformer storage: the most exact one that fits in RAM, unless the profile names one.
    if profile != "auto":
        storage = profile
    elif _transformer_ram(tsize, "bf16") <= ram_budget * 0.9:
        storage = "bf16"
    elif _transformer_ram(tsize, "fp8", mapped=facts.cuda) <= ram_budget * 0.9:
        storage = "fp8"
        notes.append("fp8 weight storage: the bf16 transformer does not fit in free RAM")
    else:
        storage = "disk"
        notes.append("weights streamed from an fp8 file on disk: not even fp8 fits in free RAM")

    if not facts.cuda:
        return _cpu_plan(profile, storage, sizes, act, notes, ram_budget)

    keep_free = int((keep_free_gb if keep_free_gb is not None else 0.0) * GB)
    vram_budget = min(facts.vram_total - CUDA_CONTEXT_BYTES, facts.vram_free) - keep_free
    storage_gpu = "fp8" if storage in ("fp8", "disk") else "bf16"
    block = tsize.block_bytes(storage)
    # Upcasting an fp8 layer to bf16 briefly holds the largest layer twice (~1/6 of a block).
    upcast = int(max(tsize.blocks) / 6) if storage_gpu == "fp8" and tsize.blocks else 0
    fixed = tsize.other_bytes(storage) + act + upcast + 64 * 1024**2  # + latents, embeddings, indices
    n_blocks = len(tsize.blocks)
    if (fixed + tsize.blocks_bytes(storage)) * FRAGMENTATION <= vram_budget:
        resident = n_blocks
    else:
        # Two slots while streaming: the block computing and the one being copied.
        room = vram_budget / FRAGMENTATION - fixed - stream_buffers(block, n_blocks).device_bytes
        resident = max(0, min(n_blocks - 1, int(room // block))) if block else 0
        if room < 0:
            notes.append("the GPU is smaller than one streamed block plus activations; expect out-of-memory")
    streamed = n_blocks - resident
    buffers = stream_buffers(block, streamed)
    sections_vram = int((fixed + resident * block + (buffers.device_bytes if buffers else 0)) * FRAGMENTATION)

    # Resident transformer blocks stay on the GPU between sections and between jobs (moving them would
    # cost a copy each time), so every later stage shares the card with them.
    kept = tsize.other_bytes(storage) + resident * block
    text_budget = vram_budget - kept * FRAGMENTATION

    # Text stage: the 8B LLaMA on the GPU if it fits, else quantized, else streamed from disk.
    llama = sizes.text_encoder
    text_act = int(0.3 * GB)
    if (llama + text_act) * FRAGMENTATION <= text_budget:
        text_mode, llama_gpu = "gpu-fp16", llama
    elif facts.bitsandbytes and (llama * 0.55 + text_act) * FRAGMENTATION <= text_budget:
        text_mode, llama_gpu = "gpu-int8", int(llama * 0.55)
    elif facts.bitsandbytes and (llama * 0.32 + text_act) * FRAGMENTATION <= text_budget:
        text_mode, llama_gpu = "gpu-int4", int(llama * 0.32)
    else:
        # Memory-mapped from the safetensors files and streamed layer by layer: no anonymous RAM.
        llama_buffers = stream_buffers(llama // 32, 32)  # the prefetcher's two slots of one layer each
        text_mode, llama_gpu = "disk-fp16", llama_buffers.device_bytes
        notes.append("the text encoder streams layer by layer from its memory-mapped files (the GPU is left "
                     "to the transformer; repeated prompts come from the prompt cache)")
    text_vram = int((kept + llama_gpu + sizes.text_encoder_2 + text_act) * FRAGMENTATION)
    # Loading passes at most one ~5 GB shard through RAM; the memory-mapped mode only its pinned staging.
    text_ram_llama = (stream_buffers(llama // 32, 32).pinned_bytes if text_mode == "disk-fp16"
                      else min(llama, int(5 * GB)))
    # Kept between jobs only where it lives off the GPU (memory-mapped); a GPU copy would sit beside the
    # transformer through every later stage.
    keep_text = (text_mode == "disk-fp16" and storage == "bf16"
                 and ram_budget > _transformer_ram(tsize, storage) + llama + 4 * GB)

    image_vram = int((kept + sizes.image_encoder + sizes.vae + 0.6 * GB) * FRAGMENTATION)
    pixel_frames = shape.height * shape.width * (8 * shape.window + 1)  # one section decode with its neighbour
    untiled = pixel_frames * UNTILED_DECODE_BYTES_PER_PIXEL_FRAME
    tiled = (kept + sizes.vae + untiled) * FRAGMENTATION > vram_budget
    decode_act = TILED_DECODE_BYTES if tiled else untiled
    decode_vram = int((kept + sizes.vae + decode_act) * FRAGMENTATION)
    # Decoded frames stay on the CPU only for the still-changing edge (stitch.py); a section's decode
    # is (8w+1) frames of float32 RGB, briefly.
    decode_ram_frames = pixel_frames * 3 * 4

    t_ram = _transformer_ram(tsize, storage, mapped=True)
    pinned = buffers.pinned_bytes if buffers else 0  # the prefetcher's staging buffers, allocated once
    base = PROCESS_RAM_BYTES + small_ram
    stages = (
        StagePlan("text", (Placement("text_encoder", text_mode.split("-")[0], text_mode.split("-")[-1]),
                           Placement("text_encoder_2", "gpu", "fp16")),
                  text_vram, base + text_ram_llama + (t_ram if keep_text else 0)),
        StagePlan("image", (Placement("image_encoder", "gpu", "fp16"), Placement("vae", "gpu", "fp16")),
                  image_vram, base + t_ram + (llama if keep_text else 0)),
        StagePlan("sections", (Placement("transformer", "gpu" if streamed == 0 else
                                         ("disk" if storage == "disk" else "stream"), storage_gpu),),
                  sections_vram, base + t_ram + pinned + (llama if keep_text else 0)),
        StagePlan("decode", (Placement("vae", "gpu", "fp16"),),
                  decode_vram, base + t_ram + decode_ram_frames + (llama if keep_text else 0)),
    )
    if storage == "bf16" and streamed == 0 and profile == "auto":
        notes.append("the whole transformer fits on the GPU; nothing streams")
    return MemoryPlan(profile, "cuda", storage, resident, streamed, text_mode, keep_text, tiled, act, stages,
                      tuple(notes), stream_buffers=buffers)


def _cpu_plan(profile: str, storage: str, sizes: ModelSizes, act: int, notes: list[str], ram_budget: int
              ) -> MemoryPlan:
    tsize = sizes.transformer
    base = PROCESS_RAM_BYTES + sizes.text_encoder_2 + sizes.image_encoder + sizes.vae
    t_ram = _transformer_ram(tsize, storage)
    # The LLaMA runs from its memory-mapped files when RAM cannot hold it as well.
    text_mode = "cpu" if sizes.text_encoder <= ram_budget * 0.9 else "disk-fp16"
    text_ram = sizes.text_encoder if text_mode == "cpu" else 0
    notes.append("no CUDA GPU: everything runs on the CPU (practical only with the tiny test model)")
    stages = (
        StagePlan("text", (Placement("text_encoder", text_mode.split("-")[0], "bf16"),), 0, base + text_ram),
        StagePlan("image", (Placement("image_encoder", "cpu", "bf16"), Placement("vae", "cpu", "bf16")), 0,
                  base + t_ram),
        StagePlan("sections", (Placement("transformer", "cpu", storage),), 0, base + t_ram + act),
        StagePlan("decode", (Placement("vae", "cpu", "bf16"),), 0, base + t_ram + TILED_DECODE_BYTES),
    )
    return MemoryPlan(profile, "cpu", storage, len(tsize.blocks), 0, text_mode, False, True, act, stages,
                      tuple(notes))
