"""The form: widget values -> a validated JobParams (one sentence when refused), and back for Reuse."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..engine import schedule
from ..errors import InputError
from ..engine import budget
from .loras import LORA_FIELDS, loras_to_rows, rows_to_loras
from .story import STORY_FIELDS, rows_to_storyboard, storyboard_to_rows
from ..params import (
    MAX_RESOLUTION, MAX_SECONDS, MAX_STEPS, MAX_WINDOW, MIN_RESOLUTION, SPEED_PRESETS, JobParams, speed_of,
)

MIN_SECONDS_UI, MAX_SECONDS_UI = 1, int(MAX_SECONDS)
RANDOM_SEED_MAX = 2**31 - 1  # stays exact in the browser's JavaScript numbers
DEFAULTS = JobParams(image="")
# Where the page starts on a CPU or in demo mode: a short job in seconds instead of minutes (the
# defaults above take about three minutes even on the tiny demo model on a 2-core CPU).
SMALL_JOB = {"seconds": 3.0, "steps": 10, "resolution": 256}
MAX_KEEP_FREE_GB = 128
# Form fields in the order of the Start endpoint's inputs (also what "reuse settings" fills).
FORM_FIELDS = (
    "image", "end_image", "prompt", "seconds", "seed", "steps", "distilled_cfg", "mode", "window", "cfg",
    "negative_prompt", "cfg_rescale", "resolution", "crf", "memory_profile", "keep_free_gb",
    "cache", "cache_threshold", "cache_max_skip", "cache_retention", "attention", "prompt_blend",
) + STORY_FIELDS + LORA_FIELDS


def form_defaults(small: bool) -> JobParams:
    """The settings the page starts with."""
    return DEFAULTS.replace(**SMALL_JOB) if small else DEFAULTS


def length_line(seconds: Any, window: Any, steps: Any = None, resolution: Any = None,
                rate: budget.StepRate | None = None) -> str:
    """The live line under the length slider: frames and sections the request becomes, and how long it
    takes here at the rate a finished job measured (when there is one)."""
    try:
        seconds, window = float(seconds), int(window)
        if not (seconds > 0 and window >= 1):
            raise ValueError
    except (TypeError, ValueError):
        return "Choose a length and a window size."
    n = schedule.section_count(seconds, window)
    frames = schedule.total_frames(n, window)
    line = (f"{frames} frames = {frames / schedule.FPS:.1f} s at {schedule.FPS} fps, "
            f"made in {n} section{'s' if n != 1 else ''} of {schedule.VAE_TEMPORAL * window} frames; "
            f"storyboard times snap to the section starts, every {schedule.VAE_TEMPORAL * window / schedule.FPS:.2f} s")
    return line + ".\n\n" + time_estimate(n, window, steps, resolution, rate)


def time_estimate(sections: int, window: int, steps: Any, resolution: Any, rate: budget.StepRate | None) -> str:
    """"About 3 h 10 min here", from the newest finished job's measured seconds per step (a square
    bucket stands in for the photo's, which the estimate does not need to be exact about)."""
    if rate is None:
        return "The time this takes here is shown once a first job has finished on this computer."
    try:
        steps, resolution = int(steps), int(resolution)
    except (TypeError, ValueError):
        steps, resolution = DEFAULTS.steps, DEFAULTS.resolution
    side = schedule.find_bucket(resolution, resolution, resolution)
    total = budget.estimate_seconds(sections, max(1, steps), schedule.window_tokens(window, *side), rate)
    same = rate.resolution == resolution and rate.window == window
    return (f"**About {budget.duration_text(total)} on this computer**"
            f"{'' if same else ' (roughly: scaled from another size)'}, at {rate.seconds_per_step:.2f} s per step "
            f"as job {rate.job_id} measured.")


def _whole(label: str, value: Any, lo: int, hi: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label} must be a whole number between {lo} and {hi}.") from None
    if not math.isfinite(number) or number != int(number):
        raise InputError(f"{label} must be a whole number between {lo} and {hi}.")
    return int(number)


def _real(label: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label} must be a number.") from None
    if not math.isfinite(number):
        raise InputError(f"{label} must be a finite number.")
    return number


def form_to_params(values: dict, models_dir: Path, outputs_dir: Path) -> JobParams:
    """Form values (by FORM_FIELDS name) -> validated JobParams; InputError with one sentence otherwise."""
    image = values.get("image")
    if not image:
        raise InputError("Choose a start photo first: upload, drop or paste one into the Start photo box.")
    prompt = values.get("prompt") or ""
    negative = values.get("negative_prompt") or ""
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise InputError("The prompt must be text.")
    seed = values.get("seed")
    if seed is None or seed == "":
        raise InputError("Enter a seed (a whole number) or press Random.")
    kwargs: dict[str, Any] = dict(
        image=str(image),
        end_image=str(values["end_image"]) if values.get("end_image") else None,
        prompt=prompt.strip(),
        seconds=_real("The length", values.get("seconds", DEFAULTS.seconds)),
        seed=_whole("The seed", seed, 0, 2**63 - 1),
        steps=_whole("Steps", values.get("steps", DEFAULTS.steps), 1, MAX_STEPS),
        distilled_cfg=_real("Distilled CFG", values.get("distilled_cfg", DEFAULTS.distilled_cfg)),
        mode=str(values.get("mode") or DEFAULTS.mode),
        window=_whole("The window size", values.get("window", DEFAULTS.window), 1, MAX_WINDOW),
        cfg=_real("Real CFG", values.get("cfg", DEFAULTS.cfg)),
        negative_prompt=negative,
        cfg_rescale=_real("CFG rescale", values.get("cfg_rescale", DEFAULTS.cfg_rescale)),
        resolution=_whole("The resolution", values.get("resolution", DEFAULTS.resolution),
                          MIN_RESOLUTION, MAX_RESOLUTION),
        crf=_whole("The mp4 quality (CRF)", values.get("crf", DEFAULTS.crf), 0, 51),
        models=str(models_dir),
        outputs=str(outputs_dir),
    )
    if not MIN_SECONDS_UI <= kwargs["seconds"] <= MAX_SECONDS_UI:
        raise InputError(f"The length must be between {MIN_SECONDS_UI} and {MAX_SECONDS_UI} seconds.")
    kwargs["memory_profile"] = str(values.get("memory_profile") or DEFAULTS.memory_profile)
    keep_free = values.get("keep_free_gb")
    keep_free = DEFAULTS.keep_free_gb if keep_free is None or keep_free == "" else _real(
        "GPU memory to keep free", keep_free)
    if not 0 <= keep_free <= MAX_KEEP_FREE_GB:
        raise InputError(f"GPU memory to keep free must be between 0 and {MAX_KEEP_FREE_GB} GB (0 = automatic).")
    kwargs["keep_free_gb"] = keep_free
    kwargs["cache"] = str(values.get("cache") or DEFAULTS.cache)
    threshold = values.get("cache_threshold")
    kwargs["cache_threshold"] = None if threshold is None or threshold == "" else _real("The cache threshold", threshold)
    kwargs["cache_max_skip"] = _whole("Most steps skipped in a row", values.get("cache_max_skip", DEFAULTS.cache_max_skip),
                                      1, MAX_STEPS)
    kwargs["cache_retention"] = _real("The share of first steps that always run",
                                      values.get("cache_retention", DEFAULTS.cache_retention))
    kwargs["attention"] = str(values.get("attention") or DEFAULTS.attention)
    kwargs["prompt_blend"] = _whole("Blend prompt changes over", values.get("prompt_blend") or 0, 0, 16)
    kwargs["timed_prompts"], kwargs["keyframes"] = rows_to_storyboard(values)
    kwargs["loras"] = rows_to_loras(values, models_dir)
    return JobParams(**kwargs).validate()


def speed_choice(cache, threshold, max_skip, retention) -> str | None:
    """The Speed preset that step cache fields amount to (None: custom settings)."""
    return speed_of({"cache": cache, "cache_threshold": threshold, "cache_max_skip": max_skip,
                     "cache_retention": retention})


def speed_settings(speed: str | None) -> tuple:
    """The step cache fields (cache, threshold, max skip, retention) a Speed choice sets."""
    preset = SPEED_PRESETS.get(speed or "")
    if preset is None:
        return (None,) * 4
    return tuple(preset[k] for k in ("cache", "cache_threshold", "cache_max_skip", "cache_retention"))


def params_to_form(params: dict, job_dir: Path | None = None, models_dir: Path | None = None) -> dict:
    """A job record's params -> form values (the inverse of form_to_params, as far as the form goes)."""
    out, rows, dropped = storyboard_to_rows(params, job_dir)
    out["story_rows"], out["story_dropped"] = max(rows, 1), dropped
    out.update(loras_to_rows(params, models_dir))
    for name in FORM_FIELDS:
        if name in ("image", "end_image") or name in STORY_FIELDS or name in LORA_FIELDS:
            continue
        # A record without the step cache or attention settings predates them: it ran uncached, on SDPA.
        value = params.get(name, {"cache": "off", "attention": "sdpa"}.get(name, getattr(DEFAULTS, name)))
        out[name] = value if value is not None or name == "cache_threshold" else getattr(DEFAULTS, name)
    out["speed"] = speed_of(out)
    # The job folder's copy of the photo (cropped to its bucket) is what the page may serve; the
    # original upload may be gone. Cropping it again to the same bucket keeps it as it is.
    image = job_dir / "input.png" if job_dir is not None else None
    out["image"] = str(image) if image is not None and image.is_file() else None
    end = job_dir / "end_input.png" if job_dir is not None else None
    out["end_image"] = str(end) if end is not None and end.is_file() else None
    return out
