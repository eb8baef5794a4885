"""Equivalence with diffusers' own HunyuanVideoFramepackPipeline on the tiny model.

Both run the same transformer class; a forward pre-hook records what it receives on every call.
Index tensors, context shapes, timesteps and the number of calls must match call for call. The
engine's start (and end) latents are handed to the reference so both draw the same noise from the
same seeded generator, which makes the first call's noisy latents identical too.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline
from PIL import Image

from framepack_local.engine import schedule
from framepack_local.engine.encode import vae_encode
from framepack_local.params import JobParams
from framepack_local.engine.generate import Engine

INDEX_KEYS = ("indices_latents", "indices_latents_clean", "indices_latents_history_2x", "indices_latents_history_4x")
SHAPE_KEYS = ("hidden_states", "latents_clean", "latents_history_2x", "latents_history_4x", "image_embeds",
              "pooled_projections")


class Recorder:
    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, _args, kwargs):
        self.calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    def close(self):
        self.handle.remove()


def run_engine(engine, tiny_model_dir, tmp_path, photo, mode, end_photo, seconds, window, steps, cfg):
    params = JobParams(image=str(photo), prompt="a cat walks", end_image=str(end_photo) if end_photo else None,
                       seconds=seconds, window=window, steps=steps, mode=mode, sampler="euler",
                       resolution=96, models=str(tiny_model_dir), outputs=str(tmp_path / "out"), seed=7,
                       cfg=cfg, negative_prompt="blurry" if cfg > 1 else "")
    models = engine.loaded_models(params)
    rec = Recorder(models.transformers[mode])
    try:
        result = engine.generate(params)
    finally:
        rec.close()
    return params, models, rec.calls, result


def run_reference(models, mode, job_dir, params, has_end, sections):
    start_rgb = np.asarray(Image.open(job_dir / "input.png").convert("RGB"))
    height, width = start_rgb.shape[:2]
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = HunyuanVideoFramepackPipeline(
        text_encoder=models.text_encoder, tokenizer=models.tokenizer, transformer=models.transformers[mode],
        vae=models.vae, scheduler=scheduler, text_encoder_2=models.text_encoder_2, tokenizer_2=models.tokenizer_2,
        image_encoder=models.image_encoder, feature_extractor=models.feature_extractor,
    )
    # diffusers samples the image posterior with the job generator; the engine uses the posterior mean
    # so encoding consumes no randomness. Hand the reference the engine's latents (start, then end)
    # so both then draw the section noise identically.
    latents = [vae_encode(models.vae, start_rgb, "cpu")]
    extra = {}
    if has_end:
        end_rgb = np.asarray(Image.open(job_dir / "end_input.png").convert("RGB"))
        latents.append(vae_encode(models.vae, end_rgb, "cpu"))
        extra["last_image"] = Image.fromarray(end_rgb)
    queue = list(latents)
    pipe.prepare_image_latents = lambda *a, **k: queue.pop(0)
    if params.cfg > 1:
        extra.update(negative_prompt=params.negative_prompt, true_cfg_scale=params.cfg)
    rec = Recorder(models.transformers[mode])
    try:
        pipe(
            image=Image.fromarray(start_rgb),
            prompt=params.prompt, height=height, width=width,
            num_frames=sections * ((params.window - 1) * 4 + 1), latent_window_size=params.window,
            num_inference_steps=params.steps, guidance_scale=params.distilled_cfg,
            generator=torch.Generator("cpu").manual_seed(params.seed), output_type="latent",
            sampling_type="inverted_anti_drifting" if mode == "inverted" else "vanilla",
            **extra,
        )
    finally:
        rec.close()
    assert not queue, "the reference did not ask for every image latent"
    return rec.calls


@pytest.mark.parametrize("mode,end,seconds,window,steps,cfg", [
    ("inverted", False, 1.0, 2, 2, 1.0),   # 4 sections: paddings 3,2,1,0
    ("inverted", False, 1.4, 2, 2, 1.0),   # 5 sections: the n > 4 schedule 3,2,2,1,0
    ("inverted", True, 0.8, 2, 2, 1.0),    # end frame in the first section
    ("forward", False, 0.8, 2, 2, 1.0),
    ("inverted", False, 0.4, 3, 2, 3.0),   # real CFG: two calls per step
])
def test_transformer_inputs_match_diffusers(tiny_model_dir, tmp_path, photo, end_photo, mode, end, seconds,
                                            window, steps, cfg):
    engine = Engine(device="cpu")
    params, models, ours, result = run_engine(engine, tiny_model_dir, tmp_path, photo, mode,
                                              end_photo if end else None, seconds, window, steps, cfg)
    sections = schedule.section_count(seconds, window)
    theirs = run_reference(models, mode, result.job_dir, params, end, sections)

    per_step = 2 if cfg > 1 else 1
    assert len(ours) == len(theirs) == sections * steps * per_step
    for i, (a, b) in enumerate(zip(ours, theirs)):
        for key in INDEX_KEYS:
            assert torch.equal(a[key].flatten().cpu(), b[key].flatten().cpu()), f"call {i}: {key}"
        for key in SHAPE_KEYS:
            assert a[key].shape == b[key].shape, f"call {i}: {key} {a[key].shape} != {b[key].shape}"
        torch.testing.assert_close(a["timestep"].float(), b["timestep"].float(), rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(a["guidance"].float(), b["guidance"].float())
        # Same number of real text tokens (the engine pads to 512 slots, diffusers to 256; the
        # transformer drops the padding for a single video).
        assert int(a["encoder_attention_mask"].sum()) == int(b["encoder_attention_mask"].sum())
    # Same seeded generator, same draw order: the very first noisy window is identical.
    torch.testing.assert_close(ours[0]["hidden_states"], theirs[0]["hidden_states"])
    # The clean context of every call agrees (start latent, history, end latent).
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if i % (steps * per_step) == 0:
            torch.testing.assert_close(a["latents_clean"][:, :, :1], b["latents_clean"][:, :, :1])
