"""Apply a memory plan: which model is loaded, where, per stage (DESIGN.md §4).

- Small parts (tokenizers, CLIP-L, SigLIP, VAE: ~1.6 GB) are loaded once and kept in RAM; on a GPU
  machine each moves to the GPU only for its stage.
- The 8B LLaMA is loaded for the text stage and released right after (unless the plan says RAM is
  plentiful), so it never sits in RAM next to the transformer on small machines.
- The transformer is loaded once in the plan's storage and kept; blocks stream to the GPU.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

import torch

from .plan import MemoryPlan
from ..weights.model_folder import load_part

logger = logging.getLogger(__name__)


def free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelManager:
    """Owns the models of one model folder and sampling mode, placed according to a plan."""

    def __init__(self, root: Path, mode: str, plan: MemoryPlan, device: torch.device, dtype: torch.dtype) -> None:
        self.root, self.mode, self.plan = Path(root), mode, plan
        self.device, self.dtype = device, dtype
        self.cuda = device.type == "cuda"
        self._small: dict[str, object] = {}
        self._llama = None
        self._transformer = None
        self.llama_loads = 0  # how often the 8B encoder was loaded (the prompt cache avoids it)

    @property
    def key(self) -> tuple:
        return (str(self.root.resolve()), self.mode, self.plan.transformer_storage, self.plan.resident_blocks,
                self.plan.text_encoder_mode, str(self.device), str(self.dtype))

    def small(self, name: str):
        """Tokenizers, processor, CLIP-L, SigLIP and the VAE: kept on the CPU between stages."""
        if name not in self._small:
            dtype = torch.float16 if self.cuda and name != "vae" else self.dtype
            self._small[name] = load_part(self.root, name, device="cpu", dtype=dtype)
        return self._small[name]

    @contextlib.contextmanager
    def on_device(self, *names: str):
        """Move small models to the compute device for one stage, and back to the CPU afterwards."""
        models = [self.small(n) for n in names]
        if self.cuda:
            for m in models:
                if isinstance(m, torch.nn.Module):
                    m.to(self.device)
        try:
            yield models
        finally:
            if self.cuda:
                for m in models:
                    if isinstance(m, torch.nn.Module):
                        m.to("cpu")
                free_accelerator_memory()

    @contextlib.contextmanager
    def text_encoder(self):
        """The LLaMA for the text stage only; released afterwards unless the plan keeps it."""
        if self._llama is None:
            self._llama = self._load_llama()
            self.llama_loads += 1
        try:
            yield self._llama
        finally:
            if not self.plan.keep_text_encoder:
                self.release_text_encoder()

    def release_text_encoder(self) -> None:
        if self._llama is not None:
            self._llama = None
            free_accelerator_memory()

    def _load_llama(self):
        mode = self.plan.text_encoder_mode
        if mode in ("gpu-int8", "gpu-int4") and self.cuda:
            return _load_llama_quantized(self.root, bits=8 if mode == "gpu-int8" else 4)
        if mode == "disk-fp16" and self.cuda:
            return load_llama_streamed(self.root, self.device, overlap=self.plan.stream_copies == "overlapped")
        dtype = torch.float16 if self.cuda else self.dtype
        return load_part(self.root, "text_encoder", device=self.device, dtype=dtype)

    def transformer(self):
        if self._transformer is None:
            self._transformer = self._load_transformer()
        return self._transformer

    def _load_transformer(self):
        from ..weights.storage import load_transformer
        from ..weights.streaming import apply_streaming

        folder = self.root / ("transformer" if self.mode == "inverted" else "transformer_f1")
        # On a GPU the uncast bf16 tensors may stay file-backed: they are copied to the card anyway.
        model = load_transformer(folder, self.plan.transformer_storage, self.dtype, cache_dir=self.root / ".cache",
                                 keep_mapped=self.cuda)
        if self.cuda:
            if self.plan.streamed_blocks == 0:
                model.to(self.device)
            else:
                summary = apply_streaming(model, self.device, resident_blocks=self.plan.resident_blocks,
                                          use_stream=self.plan.stream_copies == "overlapped")
                logger.info("transformer streaming: %s", summary)
        return model

    def vae(self):
        vae = self.small("vae")
        if self.plan.vae_tiling:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        # Frame-by-frame decoding saves GPU memory; on a CPU it only doubles the time.
        vae.use_framewise_decoding = self.cuda
        return vae

    def close(self) -> None:
        self._small.clear()
        self._llama = None
        self._transformer = None
        free_accelerator_memory()


def load_llama_streamed(root: Path, device: torch.device, overlap: bool = True):
    """LLaMA weights stay in their memory-mapped safetensors files (file-backed, not anonymous RAM:
    safetensors hands out views of the map when the dtype matches) and stream layer by layer to
    `device` with the block prefetcher (weights/prefetch.py), the next layer's copy overlapping the
    current one's compute on CUDA unless `overlap` is False (the streaming self-test failed)."""
    from ..weights.streaming import apply_streaming

    model = load_part(root, "text_encoder", device="cpu", dtype=torch.float16 if device.type == "cuda"
                      else torch.float32)
    apply_streaming(model, device, resident_blocks=0, blocks=list(model.layers), use_stream=overlap)
    return model


def _load_llama_quantized(root: Path, bits: int):
    """bitsandbytes 4/8-bit LLaMA straight onto the GPU; quantizes shard by shard while loading."""
    from transformers import BitsAndBytesConfig, LlamaModel

    config = (BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16))
    return LlamaModel.from_pretrained(root / "text_encoder", quantization_config=config, dtype=torch.float16,
                                      device_map={"": 0}, local_files_only=True, use_safetensors=True).eval()
