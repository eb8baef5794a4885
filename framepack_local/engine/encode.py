"""Conditioning and VAE helpers. Models are passed in; nothing is global."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..weights.model_folder import PROMPT_TEMPLATE

logger = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 256  # LLaMA prompt tokens after the preamble (checkpoint training setting)
TEXT_PAD_LENGTH = 512  # the packed transformer was trained on 512 text slots with a mask
CLIP_TOKENS = 77
LLAMA_SKIP_LAYERS = 2  # hidden state of the third-last layer


@dataclass
class TextConditioning:
    llama_bld: torch.Tensor  # (1, 512, D)
    llama_mask_bl: torch.Tensor  # (1, 512), 1 where a prompt token is
    clip_pooled_bd: torch.Tensor  # (1, D2)
    prompt_tokens: int
    truncated: bool


def blend_text(old: TextConditioning, new: TextConditioning, weight: float) -> TextConditioning:
    """Text conditioning part way from one prompt to another (storyboard blending).

    Both LLaMA sequences are already padded to the same 512 slots with zeros, prompt first; the blend is
    slot by slot, and a slot counts (mask) when either prompt has a token there. So the shorter prompt
    fades out of the slots only the longer one uses. CLIP's pooled vector blends the same way.
    """
    w = float(weight)
    return TextConditioning(
        llama_bld=old.llama_bld * (1.0 - w) + new.llama_bld * w,
        llama_mask_bl=torch.maximum(old.llama_mask_bl, new.llama_mask_bl),
        clip_pooled_bd=old.clip_pooled_bd * (1.0 - w) + new.clip_pooled_bd * w,
        prompt_tokens=max(old.prompt_tokens, new.prompt_tokens),
        truncated=old.truncated or new.truncated,
    )


def template_crop_start(tokenizer) -> int:
    """Tokens of the template before the user's text (95 with the real LLaMA-3 tokenizer, BOS included)."""
    preamble = PROMPT_TEMPLATE.split("{}")[0]
    return len(tokenizer(preamble, add_special_tokens=True)["input_ids"])


def count_prompt_tokens(tokenizer, prompt: str) -> int:
    """Tokens the user's prompt adds inside the template (the closing tag included)."""
    full = tokenizer(PROMPT_TEMPLATE.format(prompt), add_special_tokens=True)["input_ids"]
    return len(full) - template_crop_start(tokenizer)


@torch.no_grad()
def encode_text(text_encoder, tokenizer, text_encoder_2, tokenizer_2, prompt: str, device) -> TextConditioning:
    """LLaMA third-last hidden state (preamble cropped, padded to 512 with a mask) + CLIP-L pooled output."""
    tokenizer.padding_side = "right"  # transformers 5 pads Llama on the left; the model needs the prompt first
    crop = template_crop_start(tokenizer)
    wanted = count_prompt_tokens(tokenizer, prompt)
    inputs = tokenizer(
        PROMPT_TEMPLATE.format(prompt),
        max_length=crop + MAX_PROMPT_TOKENS,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
        return_attention_mask=True,
    )
    ids = inputs["input_ids"].to(device)
    mask = inputs["attention_mask"].to(device)
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    used = int(mask.sum())
    llama = hidden[-(LLAMA_SKIP_LAYERS + 1)][:, crop:used]
    tokens = llama.shape[1]
    llama_pad = llama.new_zeros((1, TEXT_PAD_LENGTH, llama.shape[2]))
    llama_pad[:, :tokens] = llama
    llama_mask = torch.zeros((1, TEXT_PAD_LENGTH), dtype=torch.long, device=llama.device)
    llama_mask[:, :tokens] = 1

    clip_inputs = tokenizer_2(
        prompt, max_length=CLIP_TOKENS, truncation=True, padding="max_length", return_tensors="pt"
    )
    pooled = text_encoder_2(clip_inputs["input_ids"].to(device), output_hidden_states=False).pooler_output
    return TextConditioning(
        llama_bld=llama_pad, llama_mask_bl=llama_mask, clip_pooled_bd=pooled,
        prompt_tokens=min(wanted, MAX_PROMPT_TOKENS), truncated=wanted > MAX_PROMPT_TOKENS,
    )


@torch.no_grad()
def encode_image_siglip(image_encoder, feature_extractor, rgb_hwc_uint8: np.ndarray, device) -> torch.Tensor:
    """SigLIP last hidden state of the (cropped) input photo: (1, tokens, D)."""
    inputs = feature_extractor(images=rgb_hwc_uint8, return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device=device, dtype=image_encoder.dtype)
    return image_encoder(pixel_values=pixel_values).last_hidden_state


def rgb_to_tensor(rgb_hwc_uint8: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, 1, H, W) float in [-1, 1], the VAE's input range."""
    t = torch.from_numpy(np.array(rgb_hwc_uint8, dtype=np.uint8)).float() / 127.5 - 1.0
    return t.permute(2, 0, 1)[None, :, None]


@torch.no_grad()
def vae_encode(vae, rgb_hwc_uint8: np.ndarray, device) -> torch.Tensor:
    """Latent of one frame, scaled: (1, 16, 1, H/8, W/8) float32.

    The posterior mean (mode) is used instead of a sample so encoding consumes no randomness and a
    job's result depends only on its seed and the sampling noise.
    """
    pixels = rgb_to_tensor(rgb_hwc_uint8).to(device=device, dtype=vae.dtype)
    latent = vae.encode(pixels).latent_dist.mode()
    return (latent * vae.config.scaling_factor).float()


@torch.no_grad()
def vae_decode(vae, latents_bcthw: torch.Tensor) -> torch.Tensor:
    """Decoded pixels (T, H, W, 3) float32 in [0, 1] on the CPU."""
    scaled = latents_bcthw.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    video_bcthw = vae.decode(scaled, return_dict=False)[0]
    video = ((video_bcthw[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)
    return video.cpu()


def fit_latent_preview(latent_c1hw: torch.Tensor, rgb_hwc_uint8: np.ndarray) -> torch.Tensor:
    """Least-squares 16->3 linear map (with bias) from the start image's latent to its own colours.

    The map is fitted once per job on the start image (ridge-regularised), so the cheap preview
    works for any VAE, the tiny test one included, without shipping magic numbers.
    """
    c, _, h, w = latent_c1hw.shape
    small = torch.from_numpy(rgb_hwc_uint8).float().permute(2, 0, 1)[None] / 255.0
    target = torch.nn.functional.interpolate(small, size=(h, w), mode="area")[0].reshape(3, -1).T  # (hw, 3)
    x = latent_c1hw.float().reshape(c, -1).T  # (hw, c)
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    ridge = 1e-2 * torch.eye(c + 1)
    return torch.linalg.solve(x.T @ x + ridge, x.T @ target)  # (c+1, 3)


def latent_preview(latents_bcthw: torch.Tensor, mapping: torch.Tensor) -> np.ndarray:
    """Cheap RGB preview without the VAE: frames of the window side by side, (H/8, T*W/8, 3) uint8."""
    lat = latents_bcthw[0].float().cpu()  # (C, T, h, w)
    c, t, h, w = lat.shape
    flat = lat.permute(1, 2, 3, 0).reshape(-1, c)
    rgb = torch.cat([flat, torch.ones(flat.shape[0], 1)], dim=1) @ mapping
    rgb = rgb.reshape(t, h, w, 3).permute(1, 0, 2, 3).reshape(h, t * w, 3)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
