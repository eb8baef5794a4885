"""Prompt embeddings cached on disk, so a repeated prompt skips the 8B text encoder entirely."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .encode import TextConditioning

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def cache_key(prompt: str, identity: dict, variant: str = "") -> str:
    """Same prompt + same text encoders and tokenizers (by weight/config fingerprint) + same precision
    (`variant`, e.g. "gpu-int4/torch.bfloat16") -> same key."""
    parts = identity.get("parts", {})
    blob = json.dumps({"v": CACHE_VERSION, "prompt": prompt, "variant": variant,
                       "models": {p: parts.get(p) for p in TEXT_PARTS}}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def load(cache_dir: Path, key: str) -> TextConditioning | None:
    path = cache_dir / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        return TextConditioning(
            llama_bld=t["llama"], llama_mask_bl=t["mask"], clip_pooled_bd=t["clip"],
            prompt_tokens=int(t["prompt_tokens"]), truncated=bool(t["truncated"]),
        )
    except Exception as exc:  # a damaged cache entry is only a missed shortcut
        logger.warning("ignoring unreadable prompt cache entry %s (%s)", path.name, exc)
        return None


def store(cache_dir: Path, key: str, cond: TextConditioning) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / f"{key}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({
            "llama": cond.llama_bld.detach().float().cpu().contiguous(),
            "mask": cond.llama_mask_bl.detach().cpu().contiguous(),
            "clip": cond.clip_pooled_bd.detach().float().cpu().contiguous(),
            "prompt_tokens": torch.tensor(cond.prompt_tokens),
            "truncated": torch.tensor(int(cond.truncated)),
        }, str(tmp))
        os.replace(tmp, path)
    except Exception as exc:  # a read-only or full disk just means no cache (safetensors raises its own type)
        logger.info("prompt cache not written (%s)", exc)
