"""generate(): photo -> video, one loop over the section plan (DESIGN.md §3).

Stages: 1 check inputs, 2 job folder, 3 models, 4 text, 5 image, 6 sections (sample, decode,
publish), 7 final video and record.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import jobs, schedule
from .encode import (
    encode_image_siglip, encode_text, fit_latent_preview, latent_preview, vae_decode, vae_encode,
)
from .errors import Cancelled
from .events import (
    CancelToken, EventHandler, JobFinished, JobStarted, Notice, SectionFinished, StageChanged, StepProgress,
)
from .images import cover_resize_crop, load_image
from .models import LoadedModels, check_model_folder, load_models, model_identity
from .params import JobParams
from .sampler import rescale_cfg, sample_flow
from .stitch import Stitcher
from .video import SegmentedVideo, save_png

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    status: str  # "done" or "stopped"
    job_id: str
    job_dir: Path
    video_path: Path | None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _to_uint8(frames_thwc: torch.Tensor) -> np.ndarray:
    return (frames_thwc.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


class Engine:
    """Keeps loaded models between jobs; one job at a time."""

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        # bf16 is what the checkpoints ship; CPUs are far faster and exact enough in float32.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self._models: LoadedModels | None = None
        self._models_key: tuple | None = None

    def models_for(self, root: Path, mode: str) -> LoadedModels:
        key = (str(root.resolve()), mode)
        if self._models_key != key:
            self._models = None  # drop the old set before loading the next one
            self._models = load_models(root, [mode], device=self.device, dtype=self.dtype)
            self._models_key = key
        return self._models

    def generate(
        self, params: JobParams, on_event: EventHandler | None = None, cancel: CancelToken | None = None
    ) -> JobResult:
        emit = on_event or (lambda event: None)
        cancel = cancel or CancelToken()
        started = time.perf_counter()
        timings: dict[str, float] = {}

        # 1. Everything that can be wrong with the request is found before any file is written.
        params.validate()
        root = params.models_path
        check_model_folder(root, params.mode)
        start_image = load_image(params.image, what="start image")
        end_image = load_image(params.end_image, what="end image") if params.end_image else None
        jobs.ensure_writable(params.outputs_path)

        height, width = schedule.find_bucket(start_image.height, start_image.width, params.resolution)
        sections = schedule.section_count(params.seconds, params.window)
        frames_total = schedule.total_frames(sections, params.window)
        layouts = schedule.section_layouts(sections, params.window, params.mode, end_image is not None)

        # 2. Job folder: parameters first, so even a crash leaves a record of what was asked.
        job_id, job_dir = jobs.create_job_dir(params.outputs_path)
        record = {
            "job_id": job_id, "status": "running", "params": params.to_dict(), "seed": params.seed,
            "height": height, "width": width, "sections": sections, "frames": frames_total, "fps": schedule.FPS,
            "sections_done": 0, "versions": jobs.library_versions(), "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "timings_s": timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        jobs.write_record(job_dir, record)
        start_rgb = cover_resize_crop(start_image, height, width)
        save_png(job_dir / jobs.INPUT_IMAGE, start_rgb)
        end_rgb = None
        if end_image is not None:
            end_rgb = cover_resize_crop(end_image, height, width)
            save_png(job_dir / jobs.END_IMAGE, end_rgb)
        emit(JobStarted(job_id, job_dir, sections, params.steps, frames_total, height, width))
        logger.info("job %s: %d sections x %d steps, %d frames at %dx%d", job_id, sections, params.steps,
                    frames_total, width, height)

        # 3. Models
        t0 = time.perf_counter()
        emit(StageChanged("load", "Loading models"))
        models = self.models_for(root, params.mode)
        # Frame-by-frame VAE decoding saves GPU memory but doubles the time on a CPU, where RAM is plenty.
        models.vae.use_framewise_decoding = self.device.type == "cuda"
        record["models"] = model_identity(root)
        timings["load"] = time.perf_counter() - t0

        # 4. Text
        t0 = time.perf_counter()
        emit(StageChanged("text", "Encoding the prompt"))
        text = self._encode_text(models, params.prompt)
        if text.truncated:
            emit(Notice(f"The prompt is longer than the text encoder takes; only its first "
                        f"{text.prompt_tokens} tokens are used."))
        negative = self._encode_text(models, params.negative_prompt) if params.uses_real_cfg else None
        timings["text"] = time.perf_counter() - t0

        # 5. Image: SigLIP embedding and VAE latents of the start (and end) frame.
        t0 = time.perf_counter()
        emit(StageChanged("image", "Encoding the image"))
        dtype = models.transformers[params.mode].dtype
        image_embeds = encode_image_siglip(models.image_encoder, models.feature_extractor, start_rgb, self.device)
        start_latent = vae_encode(models.vae, start_rgb, self.device)
        end_latent = None
        if end_rgb is not None:
            end_embeds = encode_image_siglip(models.image_encoder, models.feature_extractor, end_rgb, self.device)
            # Start and end are weighted equally, as in diffusers' first/last-frame pipeline.
            image_embeds = (image_embeds + end_embeds) / 2
            end_latent = vae_encode(models.vae, end_rgb, self.device)
        image_embeds = image_embeds.to(dtype)
        preview_map = fit_latent_preview(start_latent[0].cpu(), start_rgb)
        timings["image"] = time.perf_counter() - t0

        # 6. Sections
        generator = torch.Generator("cpu").manual_seed(params.seed)
        lat_h, lat_w = height // schedule.VAE_SPATIAL, width // schedule.VAE_SPATIAL
        sigmas = schedule.flow_sigmas(params.steps, schedule.window_tokens(params.window, height, width))
        inverted = params.mode == "inverted"
        history = torch.zeros(1, schedule.LATENT_CHANNELS, schedule.HISTORY_TOTAL, lat_h, lat_w)
        if not inverted:
            history = torch.cat([history, start_latent.cpu()], dim=2)
        generated = 0 if inverted else 1
        keep = max(schedule.HISTORY_TOTAL + 1, 2 * params.window + 1)  # context + decode neighbour
        writer = SegmentedVideo(job_dir, fps=schedule.FPS, crf=params.crf, prepend=inverted)
        stitcher = Stitcher(schedule.overlap_frames(params.window), prepend=inverted,
                            sink=lambda f: writer.add_finished(_to_uint8(f)))
        metadata = {"framepack_local": {"job_id": job_id, **params.to_dict()}}
        partial_path = job_dir / jobs.PARTIAL_VIDEO
        timings["sampling"] = timings["decode"] = timings["write"] = 0.0
        status, video_path = "done", None
        try:
            for layout in layouts:
                t0 = time.perf_counter()
                emit(StageChanged("sampling", f"Sampling section {layout.number + 1} of {sections}"))
                if inverted:
                    h1, h2, h4 = history[:, :, : schedule.HISTORY_TOTAL].split(
                        [schedule.HISTORY_1X, schedule.HISTORY_2X, schedule.HISTORY_4X], dim=2)
                    if layout.use_end_image:
                        h1 = end_latent.cpu()  # plans the endpoint (paper Fig. 2b)
                else:
                    h4, h2, h1 = history[:, :, -schedule.HISTORY_TOTAL:].split(
                        [schedule.HISTORY_4X, schedule.HISTORY_2X, schedule.HISTORY_1X], dim=2)
                context = {
                    "latents_clean": torch.cat([start_latent.cpu(), h1], dim=2),
                    "latents_history_2x": h2,
                    "latents_history_4x": h4,
                }
                noise = torch.randn(
                    (1, schedule.LATENT_CHANNELS, params.window, lat_h, lat_w), generator=generator
                )
                latents = self._sample_section(
                    models, params, layout, context, text, negative, image_embeds, noise, sigmas,
                    cancel, emit, preview_map, sections, started,
                ).cpu()
                timings["sampling"] += time.perf_counter() - t0

                if inverted and layout.is_last:
                    latents = torch.cat([start_latent.cpu(), latents], dim=2)
                jobs.save_section(job_dir, layout.number, latents, generator.get_state())
                if inverted:
                    history = torch.cat([latents, history], dim=2)[:, :, :keep]
                else:
                    history = torch.cat([history, latents], dim=2)[:, :, -keep:]
                generated += latents.shape[2]

                t0 = time.perf_counter()
                emit(StageChanged("decode", f"Decoding section {layout.number + 1} of {sections}"))
                # First decode: everything made so far; later: the new section plus one neighbour window.
                span = generated if layout.number == 0 else latents.shape[2] + params.window
                to_decode = history[:, :, :span] if inverted else history[:, :, -span:]
                stitcher.add(vae_decode(models.vae, to_decode))
                timings["decode"] += time.perf_counter() - t0

                t0 = time.perf_counter()
                writer.set_pending(None if stitcher.pending is None else _to_uint8(stitcher.pending))
                writer.publish(partial_path, metadata)
                timings["write"] += time.perf_counter() - t0
                record.update(sections_done=layout.number + 1)
                jobs.write_record(job_dir, record)
                emit(SectionFinished(layout.number + 1, sections, partial_path, stitcher.frames,
                                     time.perf_counter() - started))
        except Cancelled:
            status = "stopped"
            logger.info("job %s stopped after %d sections", job_id, record["sections_done"])

        # 7. Final video (stream copy of the finished segments; nothing is re-encoded).
        t0 = time.perf_counter()
        if status == "done":
            stitcher.finish()
            writer.set_pending(None)
            video_path = writer.publish(job_dir / jobs.FINAL_VIDEO, metadata)
            partial_path.unlink(missing_ok=True)
        elif record["sections_done"]:
            video_path = partial_path
        timings["write"] += time.perf_counter() - t0
        timings["total"] = time.perf_counter() - started
        record.update(status=status, video=video_path.name if video_path else None)
        jobs.write_record(job_dir, record)
        emit(JobFinished(status, job_dir, video_path, timings["total"]))
        return JobResult(status, job_id, job_dir, video_path)

    def _encode_text(self, models: LoadedModels, prompt: str):
        return encode_text(models.text_encoder, models.tokenizer, models.text_encoder_2, models.tokenizer_2,
                           prompt, self.device)

    def _sample_section(self, models, params, layout, context, text, negative, image_embeds, noise, sigmas,
                        cancel, emit, preview_map, sections, started) -> torch.Tensor:
        transformer = models.transformers[params.mode]
        dtype, device = models.transformers[params.mode].dtype, self.device

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        def idx(values: tuple[int, ...]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        fixed = {
            "image_embeds": image_embeds,
            "indices_latents": idx(layout.indices_latents),
            # Distilled guidance: the checkpoint embeds g*1000 (DESIGN.md §3).
            "guidance": torch.tensor([params.distilled_cfg * 1000.0], dtype=dtype, device=device),
            "latents_clean": dev(context["latents_clean"]),
            "indices_latents_clean": idx(layout.indices_clean),
            "latents_history_2x": dev(context["latents_history_2x"]),
            "indices_latents_history_2x": idx(layout.indices_2x),
            "latents_history_4x": dev(context["latents_history_4x"]),
            "indices_latents_history_4x": idx(layout.indices_4x),
            "return_dict": False,
        }

        def call(latents: torch.Tensor, sigma: float, cond) -> torch.Tensor:
            return transformer(
                hidden_states=dev(latents),
                timestep=torch.tensor([sigma * 1000.0], device=device, dtype=torch.float32),
                encoder_hidden_states=dev(cond.llama_bld),
                encoder_attention_mask=dev(cond.llama_mask_bl),
                pooled_projections=dev(cond.clip_pooled_bd),
                **fixed,
            )[0].float()

        last_x0 = {}

        def velocity(latents: torch.Tensor, sigma: float) -> torch.Tensor:
            cancel.raise_if_cancelled()  # at most one step of work after Stop
            latents = latents.to(device)
            v = call(latents, sigma, text)
            if negative is not None:
                v_neg = call(latents, sigma, negative)
                v = rescale_cfg(v_neg + params.cfg * (v - v_neg), v, params.cfg_rescale)
            last_x0["x0"] = latents - sigma * v  # the clean-video estimate makes the nicer preview
            return v

        def on_step(i: int, _latents: torch.Tensor) -> None:
            emit(StepProgress(layout.number + 1, sections, i + 1, params.steps, time.perf_counter() - started,
                              latent_preview(last_x0["x0"], preview_map)))

        return sample_flow(velocity, noise.to(device), sigmas, params.sampler, on_step)
