"""One transformer call's kwargs in the engine's packed layout, shared by the model tests."""

import torch


def tiny_inputs(text_dim=32, pooled_dim=32, image_dim=32, h=4, w=6, window=2, seed=0):
    """One forward's kwargs in the engine's layout (1-D index tensors, 1+2+16 history, masked prompt)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    # Forward-mode index line: [start (1)] [4x (16)] [2x (2)] [1x (1)] [window]
    return dict(
        hidden_states=r(1, 16, window, h, w),
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=r(1, 12, text_dim),
        encoder_attention_mask=torch.tensor([[1] * 7 + [0] * 5]),
        pooled_projections=r(1, pooled_dim),
        image_embeds=r(1, 16, image_dim),
        indices_latents=torch.arange(20, 20 + window),
        guidance=torch.tensor([10_000.0]),
        latents_clean=r(1, 16, 2, h, w),
        indices_latents_clean=torch.tensor([0, 19]),
        latents_history_2x=r(1, 16, 2, h, w),
        indices_latents_history_2x=torch.tensor([17, 18]),
        latents_history_4x=r(1, 16, 16, h, w),
        indices_latents_history_4x=torch.arange(1, 17),
        return_dict=False,
    )
