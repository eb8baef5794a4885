"""The drift report of a video or of a job folder (metrics: jobs/drift.py), with SigLIP appearance
similarity to the start image when a model folder with the image encoder is at hand.

`report` serves the CLI (`python -m framepack_local report`), `job_report` the engine after a job's
final video. Both stream the finished mp4 (what the user keeps, compression included) once. torch is imported only where SigLIP runs,
so a report on a foreign video without a model folder starts fast.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..files import atomic_write_json
from ..images import load_image
from ..jobs import drift
from ..jobs.video import iter_frames, probe_video
from ..params import DEFAULT_MODELS
from ..weights.model_folder import load_part, part_present
from . import schedule

logger = logging.getLogger(__name__)


def pooled(last_hidden_bld) -> np.ndarray:
    """One unit-length vector per image: SigLIP's tokens averaged (the model folder has no pooling head
    we could rely on; the same pooling on both sides keeps the cosine comparable)."""
    vector = last_hidden_bld[0].float().mean(dim=0).cpu().double().numpy()
    return vector / max(np.linalg.norm(vector), 1e-12)


class SiglipEmbedder:
    """rgb (H, W, 3) uint8 -> pooled SigLIP embedding, with the models the caller placed."""

    def __init__(self, image_encoder, feature_extractor, device) -> None:
        self.image_encoder, self.feature_extractor, self.device = image_encoder, feature_extractor, device

    def __call__(self, rgb_hwc: np.ndarray) -> np.ndarray:
        import torch

        from .encode import encode_image_siglip

        with torch.no_grad():
            return pooled(encode_image_siglip(self.image_encoder, self.feature_extractor, rgb_hwc, self.device))


def embedder_from_folder(models: Path | None, device: str | None) -> SiglipEmbedder | None:
    """SigLIP from a model folder, or None when there is none (the similarity is then null)."""
    if models is None or not (part_present(models, "image_encoder") and part_present(models, "feature_extractor")):
        return None
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return SiglipEmbedder(load_part(models, "image_encoder", device=device, dtype=dtype),
                          load_part(models, "feature_extractor"), device)


def similarity_frames(frames: int, section_frames: int) -> set[int]:
    """One frame per section: its middle."""
    return {(a + b) // 2 for a, b in drift.section_spans(frames, section_frames)}


def measure(video: Path, frames: int, fps: float, section_frames: int, embed=None,
            reference: np.ndarray | None = None, source: str = "") -> dict:
    t0 = time.perf_counter()
    meter = drift.DriftMeter(fps=fps, embed=embed, reference_embedding=reference,
                             similarity_at=similarity_frames(frames, section_frames) if embed else set())
    meter.add_all(iter_frames(video))
    report = meter.report(section_frames, source=str(source or video))
    report["seconds_taken"] = time.perf_counter() - t0
    return report


def write(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / drift.DRIFT_JSON
    chart = drift.write_chart(report, out_dir / drift.DRIFT_CHART)
    atomic_write_json(json_path, report)
    return json_path, chart


def _section_frames_from_comment(comment: str | None) -> int | None:
    """Our mp4s carry their job's parameters in the comment tag: the window gives the section length."""
    try:
        window = json.loads(comment or "")["framepack_local"]["window"]
        return schedule.VAE_TEMPORAL * int(window)
    except (ValueError, KeyError, TypeError):
        return None


def report(target: Path, out_dir: Path | None = None, models: Path | None = None,
           device: str | None = None, section_frames: int | None = None) -> tuple[dict, Path, Path]:
    """Report on a video file or a job folder; writes drift.json and drift.png (job folder, the video's
    folder, or out_dir). Similarity needs a model folder: given, the job's, or the default one if present."""
    target = Path(target)
    start_rgb = None
    if target.is_dir():
        from ..jobs import store  # lazy: it brings torch

        try:
            record = store.read_record(target)
        except (OSError, ValueError) as exc:
            raise InputError(f"{target} is neither a video nor a job folder (no readable job.json).") from exc
        video = next((target / name for name in (store.FINAL_VIDEO, store.PARTIAL_VIDEO) if (target / name).is_file()),
                     None)
        if video is None:
            raise InputError(f"The job in {target} has no video yet; let it finish a section first.")
        params = record.get("params") or {}
        section_frames = section_frames or schedule.VAE_TEMPORAL * int(params.get("window", 9))
        models = models or (Path(params["models"]) if params.get("models") else None)
        if (target / store.INPUT_IMAGE).is_file():
            start_rgb = np.array(load_image(target / store.INPUT_IMAGE, what="saved start image"))
        out_dir = out_dir or target
    elif target.is_file():
        video = target
        out_dir = out_dir or target.parent
        if models is None and DEFAULT_MODELS.is_dir():
            models = DEFAULT_MODELS
    else:
        raise InputError(f"{target} does not exist; give a video file or a job folder.")
    info = probe_video(video)
    section_frames = section_frames or _section_frames_from_comment(info.comment) or drift.DEFAULT_SECTION_FRAMES
    embed = embedder_from_folder(models, device)
    reference = embed(start_rgb) if embed is not None and start_rgb is not None else None  # else: frame 0
    result = measure(video, info.frames, info.fps or schedule.FPS, section_frames, embed, reference, str(video))
    json_path, chart = write(result, Path(out_dir))
    return result, json_path, chart


def job_report(job_dir: Path, video: Path, record: dict, embed=None, reference: np.ndarray | None = None) -> dict:
    """After a job's final video: drift.json and drift.png in the job folder; returns job.json's summary."""
    section_frames = schedule.VAE_TEMPORAL * int(record["params"]["window"])
    result = measure(video, int(record["frames"]), float(record.get("fps", schedule.FPS)), section_frames, embed,
                     reference)
    write(result, job_dir)
    return {**drift.summary(result), "seconds_taken": round(result["seconds_taken"], 3)}


def after_job(job_dir: Path, video: Path, record: dict, mgr, device, start_embeds) -> dict:
    """The report for a finished job with the models the job already holds (SigLIP for one frame per
    section). A report that fails costs the job nothing: it says why in job.json instead."""
    try:
        with mgr.on_device("image_encoder", "feature_extractor") as (siglip, processor):
            embed = SiglipEmbedder(siglip, processor, device)
            return job_report(job_dir, video, record, embed, pooled(start_embeds))
    except Exception as exc:  # noqa: BLE001 - the video is finished; a broken report must not fail the job
        logger.warning("drift report of %s failed", job_dir, exc_info=True)
        return {"error": f"The drift report failed ({type(exc).__name__}: {exc}); run "
                         f"`python -m framepack_local report {job_dir}` to retry it."}
