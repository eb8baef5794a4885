"""generate() and resume(): photo -> video, one loop over the section plan (DESIGN.md §3).

Stages: 1 check inputs, 2 job folder, 3 models, 4 text, 5 image, 6 sections (sample, save,
decode, publish), 7 final video and record. A resumed job replays its saved sections into the
same state (history, generator, video pieces) and continues with the next one, so its latents
are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..jobs import store
from ..memory.plan import JobShape, MemoryPlan, plan as plan_memory
from ..memory.probe import model_sizes_from_folder, probe
from . import (attention, budget, color, drift, lora_job, mag_ratios, prompt_cache, retry, schedule, step_cache,
               storyboard)
from .encode import (
    TextConditioning, blend_text, encode_image_siglip, encode_text, fit_latent_preview, latent_preview, vae_decode,
    vae_encode,
)
from ..errors import Cancelled, FramePackError, GpuMemoryError, InputError, OutputFolderError
from ..events import (
    CancelToken, EventHandler, JobFinished, JobStarted, Notice, SectionFinished, StageChanged, StepProgress,
)
from ..images import cover_resize_crop, load_image
from ..weights.model_folder import MODE_PARTS, LoadedModels, check_model_folder, load_part, model_identity
from ..params import JobParams
from ..memory.residency import ModelManager
from .sampler import rescale_cfg, sample_flow
from .history import PackedHistory, sections_to_replay
from .stitch import Stitcher
from ..files import save_png
from ..jobs.preview import LATEST_SECONDS, preview_scope
from ..jobs.video import SegmentedVideo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    status: str  # "done" or "stopped"
    job_id: str
    job_dir: Path
    video_path: Path | None


@dataclass(frozen=True)
class CalibrationResult:
    job: JobResult
    ratios: tuple[float, ...]  # one per step, as diffusers' MagCache measured them
    stored: Path  # where later jobs with this transformer find them


@dataclass
class _Job:
    """One job's fixed facts plus its record (written to job.json after every change)."""

    params: JobParams
    job_dir: Path
    record: dict
    start_rgb: np.ndarray
    end_rgb: np.ndarray | None
    keyframe_rgbs: list[np.ndarray]  # the storyboard's keyframes by time, cropped to the bucket
    plans: list[storyboard.SectionPlan]
    loras: list = field(default_factory=list)  # weights.lora.LoadedLora, read and checked
    started: float = field(default_factory=time.perf_counter)

    @property
    def job_id(self) -> str:
        return self.record["job_id"]

    @property
    def timings(self) -> dict:
        return self.record["timings_s"]

    def save(self) -> None:
        store.write_record(self.job_dir, self.record)


@dataclass(frozen=True)
class _Saved:
    """What a resume brings: how many sections are done, and the last ones the history needs."""

    done: int
    tail: list


@dataclass
class _Conditioning:
    texts: list[TextConditioning]  # per prompt index (params.prompts)
    negative: TextConditioning | None
    keyframe_embeds: list[torch.Tensor]  # SigLIP, per keyframe: start photo, user keyframes, end frame
    keyframe_latents: list[torch.Tensor]  # (1, 16, 1, h, w) float32 on the CPU, same order
    preview_map: torch.Tensor

    @property
    def start_latent(self) -> torch.Tensor:
        return self.keyframe_latents[0]

    def text_for(self, plan: storyboard.SectionPlan) -> TextConditioning:
        text = self.texts[plan.prompt]
        return text if plan.prompt_from is None else blend_text(self.texts[plan.prompt_from], text, plan.blend)

    def image_embeds_for(self, plan: storyboard.SectionPlan) -> torch.Tensor:
        # A stretch sees its two keyframes equally, as the start and end frame are weighted in diffusers'
        # first/last-frame pipeline; summed then divided, so one keyframe pair gives today's numbers.
        embeds = [self.keyframe_embeds[i] for i in plan.image_keyframes]
        total = embeds[0]
        for extra in embeds[1:]:
            total = total + extra
        return total / len(embeds) if len(embeds) > 1 else total


def _write_failure(job_dir: Path, exc: OSError) -> str:
    """One sentence for a file-system failure in the middle of a job."""
    name = str(exc.filename or "")
    if name and not name.startswith(str(job_dir)):
        return f"Could not use {name} ({exc.strerror or exc}); check that file or folder and resume the job."
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"The disk holding {job_dir} is full; free some space and resume the job "
                f"(the finished sections are kept).")
    if not job_dir.exists():
        return f"The job folder {job_dir} was removed while the job was running; start the job again."
    return f"Could not write to {job_dir} ({exc.strerror or exc}); check the outputs folder and resume the job."


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
        self._manager: ModelManager | None = None

    def plan_for(self, params: JobParams, height: int, width: int, lora=None) -> MemoryPlan:
        """The memory plan for a job on this machine (pure planning over probed facts)."""
        facts = probe(params.outputs_path)
        if facts.cuda and self.device.type == "cuda":
            # What this process already holds (resident transformer blocks, cached blocks) is ours to
            # place again; without this, job 2 would plan around job 1's resident blocks twice.
            facts = dataclasses.replace(facts, vram_free=min(facts.vram_total,
                                                             facts.vram_free + torch.cuda.memory_reserved()))
        if self.device.type != "cuda":
            facts = dataclasses.replace(facts, cuda=False, vram_total=0, vram_free=0, bitsandbytes=False)
        sizes = model_sizes_from_folder(params.models_path, params.mode)
        shape = JobShape(height=height, width=width, window=params.window)
        return plan_memory(facts, sizes, shape, params.memory_profile, params.keep_free_gb or None, lora)

    def streaming_for(self, params: JobParams, plan: MemoryPlan) -> tuple[MemoryPlan, str | None, dict]:
        """Overlapped block copies only where this GPU's streaming self-test saw them equal the resident
        output (run once per GPU/driver/torch/diffusers, cached in <models>/.cache); else synchronous."""
        from ..memory.streaming_selftest import needs_streaming, streaming_decision, streaming_verdict

        verdict = streaming_verdict(self.device, params.models_path / ".cache") if needs_streaming(plan) else None
        return streaming_decision(plan, verdict)

    def manager(self, params: JobParams, plan: MemoryPlan) -> ModelManager:
        """Models stay loaded between jobs while folder, mode, storage and resident blocks stay the same."""
        fresh = ModelManager(params.models_path, params.mode, plan, self.device, self.dtype)
        if self._manager is None or self._manager.key[:4] != fresh.key[:4]:
            if self._manager is not None:
                self._manager.close()  # drop the old set before loading the next one
            self._manager = fresh
        else:
            self._manager.plan = plan
        return self._manager

    def loaded_models(self, params: JobParams) -> LoadedModels:
        """Every part at once, the transformer being the very object generate() uses (tests, benchmarks)."""
        mgr = self.manager(params, self.streaming_for(params, self.plan_for(params, 64, 64))[0])
        small = {n: mgr.small(n) for n in ("tokenizer", "text_encoder_2", "tokenizer_2", "vae", "image_encoder",
                                           "feature_extractor")}
        llama = load_part(params.models_path, "text_encoder", device=self.device, dtype=self.dtype)
        return LoadedModels(text_encoder=llama, transformers={params.mode: mgr.transformer()}, **small)

    # ---- entry points

    def generate(
        self, params: JobParams, on_event: EventHandler | None = None, cancel: CancelToken | None = None
    ) -> JobResult:
        """Run a new job. Bad input raises a FramePackError before any file is written."""
        return self._new_job(params, on_event, cancel, calibrate=False)

    def calibrate_cache(
        self, params: JobParams, on_event: EventHandler | None = None, cancel: CancelToken | None = None
    ) -> CalibrationResult:
        """Sample one section uncached under diffusers' MagCache calibration and store the ratios it
        measured for this model folder's transformer and step count; later MagCache jobs use them."""
        one_section = schedule.VAE_TEMPORAL * params.window / schedule.FPS
        result = self._new_job(params.replace(seconds=one_section, cache="off"), on_event, cancel, calibrate=True)
        record = store.read_record(result.job_dir)
        found = record.get("mag_calibration")
        if result.status != "done" or not found:
            raise InputError("The calibration was stopped before its section finished; nothing was stored.")
        return CalibrationResult(result, tuple(found["ratios"]), Path(found["stored"]))

    def _new_job(self, params: JobParams, on_event, cancel, calibrate: bool) -> JobResult:
        # 1. Everything that can be wrong with the request is found before any file is written.
        params.validate()
        check_model_folder(params.models_path, params.mode)
        start_image = load_image(params.image, what="start image")
        end_image = load_image(params.end_image, what="end image") if params.end_image else None
        store.ensure_writable(params.outputs_path)
        height, width = schedule.find_bucket(start_image.height, start_image.width, params.resolution)
        sections = schedule.section_count(params.seconds, params.window)
        # The disk is what limits a long video: refuse now rather than fail with a full disk hours later.
        budget.check_disk(budget.disk_need(sections, params.window, height, width, params.crf),
                          budget.free_bytes(params.outputs_path), params.outputs_path, params.seconds)
        plans = self.section_plan(params, end_image is not None)
        keyframes = [load_image(path, what=f"keyframe image at {t:g} s") for t, path in params.sorted_keyframes]
        self._cache_plan(params)  # a cache that cannot work is refused now
        params, loras = lora_job.prepare(params)  # LoRA files found, read and checked against the transformer

        # 2. Job folder: parameters first, so even a crash leaves a record of what was asked.
        # The worker hands out the id at submit, so the page, the queue and the folder name agree.
        job_id, job_dir = store.create_job_dir(params.outputs_path, params.extra.get("job_id"))
        record = {
            "job_id": job_id, "status": "running", "params": params.to_dict(), "seed": params.seed,
            "height": height, "width": width, "sections": sections,
            "frames": schedule.total_frames(sections, params.window), "fps": schedule.FPS, "sections_done": 0,
            "versions": store.library_versions(), "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "timings_s": {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if params.has_storyboard:
            record["storyboard"] = storyboard.record(params)
        if loras:
            record["loras"] = [lora.record() for lora in loras]
        job = _Job(params, job_dir, record, cover_resize_crop(start_image, height, width),
                   cover_resize_crop(end_image, height, width) if end_image is not None else None,
                   [cover_resize_crop(k, height, width) for k in keyframes], plans, loras)
        self._claim(job)
        save_png(job_dir / store.INPUT_IMAGE, job.start_rgb)
        if job.end_rgb is not None:
            save_png(job_dir / store.END_IMAGE, job.end_rgb)
        for i, rgb in enumerate(job.keyframe_rgbs, 1):
            save_png(job_dir / store.KEYFRAME_IMAGE.format(i), rgb)
        return self._run_guarded(job, _Saved(0, []), on_event, cancel, calibrate)

    RESUME_OVERRIDES = ("memory_profile", "keep_free_gb", "models", "outputs")

    def resume(
        self, job_dir: Path, on_event: EventHandler | None = None, cancel: CancelToken | None = None,
        overrides: dict | None = None,
    ) -> JobResult:
        """Continue a stopped, failed or interrupted job from its last finished section.

        `overrides` may change where things live (memory profile, GPU memory to keep free, the model
        folder) but never what is computed, so the result stays bit-identical.
        """
        job_dir = Path(job_dir)
        try:
            record = store.read_record(job_dir)
        except (OSError, ValueError) as exc:
            raise InputError(f"{job_dir} is not a job folder that can be resumed (no readable job.json).") from exc
        if record.get("status") == "done":
            raise InputError(f"The job {record.get('job_id')} is already finished; its video is in {job_dir}.")
        if store.running_elsewhere(record):
            raise InputError(f"The job {record.get('job_id')} is still running in another FramePack Local process "
                             f"(pid {record.get('pid')}); stop it there first.")
        saved_params = dict(record["params"])
        # A record without these predates them: it ran uncached, on SDPA.
        saved_params.setdefault("cache", "off")
        saved_params.setdefault("attention", "sdpa")
        unknown = set(overrides or {}) - set(self.RESUME_OVERRIDES)
        if unknown:
            raise InputError(f"Only the memory settings and folders can change on resume, not {sorted(unknown)}.")
        if saved_params.get("memory_profile", "auto") == "auto" and "memory_profile" not in (overrides or {}):
            # Keep the transformer storage of the first run: fp8 and bf16 give different numbers.
            saved_params["memory_profile"] = (record.get("memory_plan") or {}).get("transformer_storage", "auto")
        params = JobParams(**{**saved_params, **(overrides or {})}).validate()
        check_model_folder(params.models_path, params.mode)
        start_rgb = np.array(load_image(job_dir / store.INPUT_IMAGE, what="saved start image"))
        end_rgb = None
        if params.end_image:
            end_rgb = np.array(load_image(job_dir / store.END_IMAGE, what="saved end image"))
        keyframe_rgbs = [np.array(load_image(job_dir / store.KEYFRAME_IMAGE.format(i), what="saved keyframe image"))
                         for i in range(1, len(params.keyframes) + 1)]
        plans = self.section_plan(params, end_rgb is not None)
        loras = lora_job.prepare_resumed(params, record)  # the same files, unchanged, or one sentence
        done = int(record.get("sections_done", 0))
        budget.check_disk(
            budget.disk_need(len(plans), params.window, record["height"], record["width"], params.crf, done,
                             budget.measured_bytes_per_frame(record.get("video"))),
            budget.free_bytes(job_dir), job_dir, params.seconds)
        try:
            # Only what the packed history still holds is read back (flat RAM and a fast resume).
            tail = store.load_section_tail(job_dir, done, sections_to_replay(params.window))
        except Exception as exc:  # missing or unreadable section file
            raise InputError(f"The job in {job_dir} lacks a readable section file ({exc}); it cannot be "
                             f"resumed, start it again.") from exc
        store.drop_sections_after(job_dir, done)  # a crash can leave a section that was never published
        record["timings_s"] = {}
        record["resumed"] = record.get("resumed", 0) + 1
        job = _Job(params, job_dir, record, start_rgb, end_rgb, keyframe_rgbs, plans, loras)
        self._claim(job)
        return self._run_guarded(job, _Saved(done, tail), on_event, cancel)

    @staticmethod
    def section_plan(params: JobParams, has_end_image: bool) -> list[storyboard.SectionPlan]:
        """The job's sections in sampling order (pure; InputError for a storyboard that cannot work)."""
        return storyboard.plan_for(params, has_end_image)

    @staticmethod
    def _cache_plan(params: JobParams, record: dict | None = None, resumed: bool = False,
                    calibrate: bool = False) -> step_cache.StepCachePlan:
        """The job's step cache: calibrated ratios of its transformer beat shipped ones; a resumed job
        keeps the ratios it started with (bit-identical even if a calibration happened in between)."""
        calibrated = {}
        if record is not None and params.cache == "mag":
            part = (record.get("models") or {}).get("parts", {}).get(MODE_PARTS[params.mode], {})
            calibrated = mag_ratios.load_calibrated(params.models_path, part.get("weights_fingerprint"))
        return step_cache.plan_step_cache(
            step_cache.CALIBRATE if calibrate else params.cache, params.mode, params.steps, params.cache_threshold,
            params.cache_max_skip, params.cache_retention, calibrated=calibrated,
            recorded=(record or {}).get("step_cache") if resumed else None)

    # ---- the job

    def _claim(self, job: _Job) -> None:
        # Who runs the job: lets a restarted app tell a dead job from one another process is running.
        job.record.update(status="running", pid=os.getpid(), host=socket.gethostname(), error=None)
        job.save()

    def _run_guarded(self, job: _Job, saved: "_Saved", on_event, cancel, calibrate: bool = False) -> JobResult:
        try:
            return self._run(job, saved, on_event or (lambda event: None), cancel or CancelToken(), calibrate)
        except FramePackError as exc:
            self._fail(job, str(exc))
            raise
        except torch.cuda.OutOfMemoryError as exc:
            sentence = ("The GPU ran out of memory; the finished sections are kept: raise \"GPU memory to keep "
                        "free\" (or choose the fp8 or disk memory profile) and resume the job.")
            self._fail(job, sentence)
            raise GpuMemoryError(sentence) from exc
        except MemoryError as exc:
            sentence = ("The computer ran out of RAM; the finished sections are kept: choose the disk memory "
                        "profile and resume the job.")
            self._fail(job, sentence)
            raise GpuMemoryError(sentence) from exc
        except OSError as exc:
            sentence = _write_failure(job.job_dir, exc)
            self._fail(job, sentence)
            raise OutputFolderError(sentence) from exc
        except Exception as exc:
            self._fail(job, f"The job failed unexpectedly ({type(exc).__name__}); the finished sections are kept.")
            raise

    def _fail(self, job: _Job, sentence: str) -> None:
        job.record.update(status="failed", error=sentence)
        try:
            job.save()
        except (OSError, FramePackError):  # e.g. the folder is gone: the sentence still reaches the caller
            logger.warning("could not record the failure of job %s", job.job_id)

    def _run(self, job: _Job, saved: "_Saved", emit: EventHandler, cancel: CancelToken, calibrate: bool) -> JobResult:
        params, record, timings = job.params, job.record, job.timings
        height, width, sections = record["height"], record["width"], record["sections"]
        emit(JobStarted(job.job_id, job.job_dir, sections, params.steps, record["frames"], height, width))
        logger.info("job %s: %d sections x %d steps, %d frames at %dx%d%s", job.job_id, sections, params.steps,
                    record["frames"], width, height, f", resuming after {saved.done}" if saved.done else "")

        # 3. Models, placed by the memory plan
        t0 = time.perf_counter()
        emit(StageChanged("load", "Planning memory and loading models"))
        planned = self.plan_for(params, height, width, lora_job.cost(job.loras, self.dtype))
        plan, streaming_notice, record["streaming"] = self.streaming_for(params, planned)
        if streaming_notice:
            emit(Notice(streaming_notice))
        logger.info("%s", plan.table())
        record["memory_plan"] = plan.to_dict()
        record["models"] = model_identity(params.models_path)
        mgr = self.manager(params, plan)
        timings["load"] = time.perf_counter() - t0

        cond = self._condition(job, mgr, emit)
        t0 = time.perf_counter()
        transformer = mgr.transformer()
        vae = mgr.vae()
        timings["load"] += time.perf_counter() - t0

        # 6. Sections
        inverted = params.mode == "inverted"
        generator = torch.Generator("cpu").manual_seed(params.seed)
        history = PackedHistory(inverted, params.window, cond.start_latent)
        sigmas = schedule.flow_sigmas(params.steps, schedule.window_tokens(params.window, height, width))
        overlap = schedule.overlap_frames(params.window)
        corrector = color.ColourCorrector.for_job(params.color_correction, params.color_strength, job.start_rgb,
                                                  record.get("color_correction"), saved.done)
        if corrector is not None:
            record["color_correction"] = corrector.records  # one entry per finished section
        judge = retry.SectionJudge.for_job(params, self._section_embedder(mgr), drift.pooled(cond.keyframe_embeds[0]),
                                           record, saved.done)
        if saved.done:
            writer = SegmentedVideo.from_state(job.job_dir, record["video"], fps=schedule.FPS, crf=params.crf,
                                               prepend=inverted)
            last_span = None
            # Sections before the tail left the history window; only their frame count matters.
            history.skip((saved.done - len(saved.tail)) * params.window)
            for section in saved.tail:
                last_span = history.add(section["latents"])
            generator.set_state(saved.tail[-1]["rng_state"])
            stitcher = Stitcher(overlap, prepend=inverted, sink=lambda f: writer.add_finished(_to_uint8(f)))
            # The edge that the next section blends with is a pure function of the last decode.
            with mgr.on_device("vae"):
                decoded = vae_decode(vae, last_span)
            if corrector is not None:
                decoded = corrector.replay_last(decoded)  # the map it was given, from job.json
            stitcher.pending = decoded[:overlap].clone() if inverted else decoded[-overlap:].clone()
            stitcher.emitted = writer.finished_frame_count
        else:
            writer = SegmentedVideo(job.job_dir, fps=schedule.FPS, crf=params.crf, prepend=inverted)
            stitcher = Stitcher(overlap, prepend=inverted, sink=lambda f: writer.add_finished(_to_uint8(f)))

        metadata = {"framepack_local": {"job_id": job.job_id, **params.to_dict()}}
        partial_path = job.job_dir / store.PARTIAL_VIDEO
        for key in ("sampling", "decode", "write"):
            timings[key] = 0.0
        cache_plan = self._cache_plan(params, record, resumed=bool(saved.done), calibrate=calibrate)
        record["step_cache"] = cache_plan.record()
        if cache_plan.ratios_source:
            logger.info("MagCache ratios: %s", cache_plan.ratios_source)
        # One number per section in sampling order: how many steps ran the blocks (positive pass).
        record["steps_computed"] = list(record.get("steps_computed") or [])[:saved.done]
        cache = step_cache.AttachedCache(transformer, cache_plan, params.steps)
        # A resume asks for the kernel the job started with: another one would change the numbers.
        requested = ((record.get("attention") or {}).get("used") if saved.done else None) or params.attention
        kernel = attention.ActiveAttention(
            transformer, attention.choose(requested, attention.unavailable_reasons(self.device)),
            lambda sentence: emit(Notice(sentence)))
        record["attention"] = kernel.record(params.attention)
        for note in (n for lora in job.loras for n in lora.notes):
            emit(Notice(note))
        adapters = lora_job.attach(transformer, job.loras, plan, self.device, self.dtype)
        status = "done"
        try:
            for section in job.plans[saved.done:]:
                layout = section.layout
                steps_computed = 0
                tried = []  # per attempt: (latents, history with them, colour-corrected decode, colour entry)
                for attempt in range(params.auto_retry + 1):  # engine/retry.py: re-sample a drifted section
                    t0 = time.perf_counter()
                    emit(StageChanged("sampling", f"Sampling section {layout.number + 1} of {sections}"
                                      + (f" again (attempt {attempt + 1})" if attempt else "")))
                    cache.new_section()
                    seed = retry.attempt_seed(params.seed, layout.number, attempt) if attempt else None
                    noise = torch.randn(
                        (1, schedule.LATENT_CHANNELS, params.window, height // schedule.VAE_SPATIAL,
                         width // schedule.VAE_SPATIAL),
                        generator=generator if seed is None else torch.Generator("cpu").manual_seed(seed))
                    endpoint = cond.keyframe_latents[section.endpoint] if section.endpoint is not None else None
                    context = history.context(layout, cond.keyframe_latents[section.anchor], endpoint)
                    latents = self._sample_section(transformer, job, section, context, cond, noise, sigmas, cancel,
                                                   emit, cache, kernel).cpu()
                    timings["sampling"] += time.perf_counter() - t0
                    steps_computed += cache.steps_computed()
                    record["attention"] = kernel.record(params.attention)  # a fallback happens at the first call
                    if calibrate:
                        self._store_calibration(job, cache)

                    if inverted and layout.is_last:
                        latents = torch.cat([cond.start_latent, latents], dim=2)
                    trial = copy.copy(history)  # add() replaces its tensors, so the copy leaves `history` as it was
                    to_decode = trial.add(latents)

                    t0 = time.perf_counter()
                    emit(StageChanged("decode", f"Decoding section {layout.number + 1} of {sections}"))
                    with mgr.on_device("vae"):
                        decoded = vae_decode(vae, to_decode)
                    new = color.new_frames(decoded.shape[0], overlap, inverted, stitcher.pending is None)
                    entry = None
                    if corrector is not None:  # pixels after the decode, before any frame is written (color.py)
                        decoded, entry = corrector.correct(
                            decoded, new, color.holds_start_frame(inverted, layout.is_last, layout.number))
                    timings["decode"] += time.perf_counter() - t0
                    tried.append((latents, trial, decoded, entry))
                    if judge is None or judge.check(layout.number, attempt, seed, decoded, new, inverted):
                        break
                chosen = judge.choose() if judge is not None else 0
                latents, history, decoded, entry = tried[chosen]
                if judge is not None:
                    said = judge.commit(layout.number, chosen)
                    record.update(section_scores=judge.kept, retries=judge.retries)
                    if said:
                        emit(Notice(said))
                if corrector is not None:
                    corrector.commit(entry)
                record["steps_computed"].append(steps_computed)
                store.save_section(job.job_dir, layout.number, latents, generator.get_state())
                stitcher.add(decoded)

                t0 = time.perf_counter()
                writer.set_pending(None if stitcher.pending is None else _to_uint8(stitcher.pending))
                done_now = layout.number + 1
                shown = stitcher.frames
                if preview_scope(done_now, record.get("preview_full_at", 0), writer.frame_count / schedule.FPS) == "full":
                    writer.publish(partial_path, metadata)
                    record["preview_full_at"] = done_now
                else:  # a long video: the latest minute now, the whole of it now and then (jobs/preview.py)
                    if not record.get("preview_latest_said"):
                        emit(Notice(f"The video so far now shows its latest {LATEST_SECONDS:.0f} s, so long videos "
                                    "stay fast; the whole video is shown again now and then, and at the end."))
                        record["preview_latest_said"] = True
                    writer.publish(partial_path, metadata, latest_frames=int(LATEST_SECONDS * schedule.FPS))
                    shown = writer.last_published_frames
                timings["write"] += time.perf_counter() - t0
                record.update(sections_done=done_now, video=writer.state())
                job.save()
                emit(SectionFinished(done_now, sections, partial_path, shown, time.perf_counter() - job.started))
        except Cancelled:
            status = "stopped"
            logger.info("job %s stopped after %d sections", job.job_id, record["sections_done"])
        finally:
            adapters.close()  # the kept transformer is the plain one again for the next job
            cache.close()
            kernel.close()
        # A stopped section's count is not a finished section's.
        record["steps_computed"] = record["steps_computed"][:record["sections_done"]]

        # 7. Final video (stream copy of the finished segments; nothing is re-encoded).
        t0 = time.perf_counter()
        video_path = None
        if status == "done":
            stitcher.finish()
            writer.set_pending(None)
            video_path = writer.publish(job.job_dir / store.FINAL_VIDEO, metadata)
            partial_path.unlink(missing_ok=True)
            if params.drift_report:  # engine/drift.py: drift.json and drift.png beside the video
                emit(StageChanged("write", "Measuring drift"))
                t1 = time.perf_counter()
                record["drift"] = drift.after_job(job.job_dir, video_path, record, mgr, self.device,
                                                  cond.keyframe_embeds[0])
                timings["drift"] = time.perf_counter() - t1
        elif record["sections_done"]:
            if record.get("preview_full_at") != record["sections_done"]:
                writer.publish(partial_path, metadata)  # a stopped long job keeps its whole video so far
                record["preview_full_at"] = record["sections_done"]
            video_path = partial_path
        timings["write"] += time.perf_counter() - t0
        timings["total"] = time.perf_counter() - job.started
        record.update(status=status, video=writer.state(), video_file=video_path.name if video_path else None)
        job.save()
        emit(JobFinished(status, job.job_dir, video_path, timings["total"]))
        return JobResult(status, job.job_id, job.job_dir, video_path)

    def _section_embedder(self, mgr: ModelManager):
        """SigLIP on one frame, the encoder on the device only for that call (retry scores)."""
        def embed(rgb: np.ndarray) -> np.ndarray:
            with mgr.on_device("image_encoder", "feature_extractor") as (siglip, processor):
                return drift.SiglipEmbedder(siglip, processor, self.device)(rgb)
        return embed

    @staticmethod
    def _store_calibration(job: _Job, cache: step_cache.AttachedCache) -> None:
        params, ratios = job.params, cache.calibration_ratios()
        fingerprint = job.record["models"].get("parts", {}).get(MODE_PARTS[params.mode], {}).get("weights_fingerprint")
        if not fingerprint or not ratios or len(ratios) != params.steps:
            raise InputError("The transformer's blocks could not be measured for calibration; nothing was stored.")
        path = mag_ratios.store_calibrated(params.models_path, fingerprint, ratios, job.job_id)
        job.record["mag_calibration"] = {"ratios": [round(r, 5) for r in ratios], "stored": str(path),
                                         "fingerprint": fingerprint}
        logger.info("MagCache calibration of %s at %d steps stored in %s", MODE_PARTS[params.mode], params.steps, path)

    def _condition(self, job: _Job, mgr: ModelManager, emit: EventHandler) -> _Conditioning:
        """4. Text and 5. image conditioning (recomputed on resume: all of it is deterministic)."""
        params, timings = job.params, job.timings
        t0 = time.perf_counter()
        emit(StageChanged("text", "Encoding the prompt"))
        # Every distinct prompt once, through the prompt cache; the 8B encoder loads at most once.
        wanted = params.prompts + ([params.negative_prompt] if params.uses_real_cfg else [])
        unique = list(dict.fromkeys(wanted))
        encoded = dict(zip(unique, self._encode_prompts(mgr, unique, job.record["models"])))
        texts = [encoded[p] for p in params.prompts]
        negative = encoded[params.negative_prompt] if params.uses_real_cfg else None
        for prompt, text in zip(params.prompts, texts):
            if text.truncated:
                emit(Notice(f"The prompt \"{prompt[:40]}…\" is longer than the text encoder takes; only its "
                            f"first {text.prompt_tokens} tokens are used."))
        timings["text"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        emit(StageChanged("image", "Encoding the image"))
        # Keyframe 0 is the start photo, then the storyboard's keyframes by time, then the end frame.
        frames = [job.start_rgb] + job.keyframe_rgbs + ([job.end_rgb] if job.end_rgb is not None else [])
        with mgr.on_device("image_encoder", "feature_extractor", "vae") as (siglip, processor, _):
            vae = mgr.vae()
            embeds = [encode_image_siglip(siglip, processor, rgb, self.device).cpu() for rgb in frames]
            latents = [vae_encode(vae, rgb, self.device).cpu() for rgb in frames]
        timings["image"] = time.perf_counter() - t0
        return _Conditioning(texts, negative, embeds, latents, fit_latent_preview(latents[0][0], job.start_rgb))

    def _encode_prompts(self, mgr: ModelManager, prompts: list[str], identity: dict) -> list[TextConditioning]:
        """Cached embeddings where present; the 8B encoder is loaded only for the ones missing."""
        cache_dir = mgr.root / ".cache" / "prompts"
        variant = f"{mgr.plan.text_encoder_mode}/{self.dtype}"  # int4 and fp16 embeddings differ
        keys = [prompt_cache.cache_key(p, identity, variant) for p in prompts]
        found = [prompt_cache.load(cache_dir, k) for k in keys]
        if all(f is not None for f in found):
            logger.info("prompt embeddings from the cache; the text encoder is not loaded")
            return found
        with mgr.text_encoder() as llama, mgr.on_device("tokenizer", "text_encoder_2", "tokenizer_2") as (
                tok, clip, tok2):
            for i, prompt in enumerate(prompts):
                if found[i] is None:
                    found[i] = encode_text(llama, tok, clip, tok2, prompt, self.device)
                    prompt_cache.store(cache_dir, keys[i], found[i])
        return found

    def _sample_section(self, transformer, job: _Job, section: storyboard.SectionPlan, context: dict,
                        cond: _Conditioning, noise: torch.Tensor, sigmas: list[float], cancel: CancelToken,
                        emit: EventHandler, cache: step_cache.AttachedCache,
                        kernel: attention.ActiveAttention) -> torch.Tensor:
        params, layout = job.params, section.layout
        dtype, device = self.dtype, self.device
        sections = job.record["sections"]
        text_now = cond.text_for(section)

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        def idx(values: tuple[int, ...]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        fixed = {
            "image_embeds": dev(cond.image_embeds_for(section)),
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

        def call(latents: torch.Tensor, sigma: float, text: TextConditioning, pass_name: str) -> torch.Tensor:
            cache.counting = pass_name == "cond"
            with cache.pass_context(pass_name):
                return kernel.call(lambda: transformer(
                    hidden_states=dev(latents),
                    timestep=torch.tensor([sigma * 1000.0], device=device, dtype=torch.float32),
                    encoder_hidden_states=dev(text.llama_bld),
                    encoder_attention_mask=dev(text.llama_mask_bl),
                    pooled_projections=dev(text.clip_pooled_bd),
                    **fixed,
                )[0].float())

        last_x0 = {}

        def velocity(latents: torch.Tensor, sigma: float) -> torch.Tensor:
            cancel.raise_if_cancelled()  # at most one step of work after Stop
            latents = latents.to(device)
            v = call(latents, sigma, text_now, "cond")
            if cond.negative is not None:
                v_neg = call(latents, sigma, cond.negative, "uncond")
                v = rescale_cfg(v_neg + params.cfg * (v - v_neg), v, params.cfg_rescale)
            last_x0["x0"] = latents - sigma * v  # the clean-video estimate makes the nicer preview
            return v

        def on_step(i: int, _latents: torch.Tensor) -> None:
            emit(StepProgress(layout.number + 1, sections, i + 1, params.steps, time.perf_counter() - job.started,
                              latent_preview(last_x0["x0"], cond.preview_map), cache.steps_computed()))

        return sample_flow(velocity, noise.to(device), sigmas, params.sampler, on_step)
