"""Flow-matching sampling of one section: UniPC (bh1, flow mode) by default, Euler as an option."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

# model(latents, sigma) -> velocity; called once per step (twice inside when real CFG is on).
VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor], None]


def rescale_cfg(guided: torch.Tensor, positive: torch.Tensor, rescale: float) -> torch.Tensor:
    """Pull the guided prediction's std back towards the positive one (Lin et al. 2023, eq. 15-16)."""
    if rescale <= 0:
        return guided
    dims = list(range(1, guided.ndim))
    factor = positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (rescale * factor + (1.0 - rescale))


def _unipc(sigmas: list[float]) -> UniPCMultistepScheduler:
    # flow_shift=1 and no dynamic shifting: the sigmas we pass are already time-shifted (schedule.py).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
        solver_type="bh1", solver_order=2, lower_order_final=True,
    )
    scheduler.set_timesteps(sigmas=np.asarray(sigmas[:-1], dtype=np.float64))
    # Timesteps are stored as integers and can repeat near 0; step by position, not by lookup.
    scheduler.set_begin_index(0)
    return scheduler


@torch.no_grad()
def sample_flow(
    velocity: VelocityFn,
    noise_bcthw: torch.Tensor,
    sigmas: list[float],
    sampler: str,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate from pure noise (sigma=1) to data (sigma=0) along the given sigma schedule."""
    latents = noise_bcthw.float()
    steps = len(sigmas) - 1
    if sampler == "euler":
        for i in range(steps):
            v = velocity(latents, sigmas[i]).float()
            latents = latents + (sigmas[i + 1] - sigmas[i]) * v
            if on_step:
                on_step(i, latents)
        return latents
    if sampler != "unipc":
        raise ValueError(f"unknown sampler {sampler!r}")
    scheduler = _unipc(sigmas)
    last = len(scheduler.timesteps) - 1
    for i, t in enumerate(scheduler.timesteps):
        # The scheduler nudges sigma[0] below 1 to avoid log(0); feed the model the same value it steps with.
        sigma = float(scheduler.sigmas[i])
        v = velocity(latents, sigma).float()
        if i == last and sigmas[-1] == 0.0:
            # The last step lands on sigma 0, where UniPC's order-1 predictor is exactly the data
            # prediction x - sigma*v; diffusers' bh1 weight B(h)=h is infinite there (0*inf = NaN).
            latents = latents - sigma * v
        else:
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        if on_step:
            on_step(i, latents)
    return latents
