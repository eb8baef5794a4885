"""The one frozen parameter object of a job. All defaults live here (they follow the reference app)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

# User data lives next to app.py unless the user points elsewhere.
APP_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = APP_ROOT / "models"
DEFAULT_OUTPUTS = APP_ROOT / "outputs"

MODES = ("inverted", "forward")
SAMPLERS = ("unipc", "euler")
MEMORY_PROFILES = ("auto", "bf16", "fp8", "disk")  # same names as memory.plan.PROFILES
CACHE_MODES = ("off", "mag", "first-block")  # what they do: engine/step_cache.py
# A threshold of None means these: the MagCache authors' FramePack demo, and diffusers' FirstBlockCache default.
CACHE_DEFAULT_THRESHOLD = {"mag": 0.1, "first-block": 0.05}
COLOR_CORRECTIONS = ("off", "start", "neighbour")  # engine/color.py
ATTENTION_BACKENDS = ("auto", "sdpa", "flash", "sage")  # engine/attention.py
# The page's "Speed" choice, as step cache settings. Balanced is the MagCache authors' FramePack demo
# (threshold 0.1, K = 2, retention 0.2); fast is their README's stronger setting "E015K4R02"
# (Zehong-Ma/MagCache, MagCache4FramePack/README.md).
SPEED_PRESETS = {
    "off": {"cache": "off", "cache_threshold": None, "cache_max_skip": 2, "cache_retention": 0.2},
    "balanced": {"cache": "mag", "cache_threshold": 0.1, "cache_max_skip": 2, "cache_retention": 0.2},
    "fast": {"cache": "mag", "cache_threshold": 0.15, "cache_max_skip": 4, "cache_retention": 0.2},
}

# Seeds are stored in JSON and fed to torch.Generator.manual_seed; 2**63-1 keeps both exact.
MAX_SEED = 2**63 - 1
# No file format or data structure limits the length (the packed context has a fixed size, previews
# and resume read a bounded tail); the disk does, and it is checked before a job starts
# (engine/budget.py). One hour is a ceiling against typos: 108 001 frames, which at the reference
# app's published 1.5 s per frame on an RTX 4090 (TeaCache) is already about two days of sampling.
MAX_SECONDS = 3600.0
MAX_STORYBOARD = 64  # timed prompts, and keyframes, per job
MAX_LORAS = 16  # LoRA files per job
LORA_WEIGHT_RANGE = (-2.0, 2.0)
MAX_STEPS = 100
MAX_WINDOW = 33
MAX_RETRIES = 8  # re-samples per section (each costs a whole section's sampling)
MIN_RESOLUTION = 64
MAX_RESOLUTION = 1280


@dataclass(frozen=True)
class JobParams:
    """Everything that decides a job's result. Build by keyword; call validate() before use."""

    image: str
    prompt: str = ""  # in force from 0 s until the first timed prompt
    end_image: str | None = None
    # Storyboard (engine/storyboard.py): (seconds, prompt) and (seconds, image path) pairs; tuples, so the
    # params stay frozen and hashable (lists from JSON are turned into tuples).
    timed_prompts: tuple = ()
    keyframes: tuple = ()
    prompt_blend: int = 0  # sections over which a prompt change blends in
    # LoRA files (weights/lora.py): (path or name in models/loras/, weight) pairs, a tuple like the storyboard's.
    loras: tuple = ()
    seconds: float = 5.0
    seed: int = 31337
    steps: int = 25
    window: int = 9
    mode: str = "inverted"
    distilled_cfg: float = 10.0
    cfg: float = 1.0
    negative_prompt: str = ""
    cfg_rescale: float = 0.0
    resolution: int = 640
    crf: int = 16
    sampler: str = "unipc"
    # Step cache (engine/step_cache.py): skipped steps reuse the last residual. MagCache by default, as
    # every peer runs a step cache by default; cache_threshold None = the mode's default.
    cache: str = "mag"
    cache_threshold: float | None = None
    cache_max_skip: int = 2
    cache_retention: float = 0.2
    # Attention kernel: auto = SageAttention or FlashAttention when installed and the GPU runs it, else SDPA.
    attention: str = "auto"
    # Drift (README "Drift"): the report after the final video; colour correction and self-correcting
    # sections while sampling (engine/color.py, engine/retry.py).
    drift_report: bool = True
    color_correction: str = "off"  # off | start (towards the start photo) | neighbour (the finished section next to it)
    color_strength: float = 0.5  # 0 = none, 1 = match the reference's colour statistics fully
    # Self-correcting sections: re-sample a drifted section up to auto_retry times. Provisional thresholds
    # (untuned without the real weights): a drop of the SigLIP similarity to the start, a relative loss of
    # sharpness, a seam jump in 0-255 levels, each against the sections kept before it.
    auto_retry: int = 0
    retry_threshold: float = 0.05
    retry_sharpness_drop: float = 0.5
    retry_seam_jump: float = 8.0
    # Memory settings change where weights live, never the result (memory/plan.py).
    memory_profile: str = "auto"
    keep_free_gb: float = 0.0
    models: str = str(DEFAULT_MODELS)
    outputs: str = str(DEFAULT_OUTPUTS)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("timed_prompts", "keyframes", "loras"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value))

    def replace(self, **changes) -> "JobParams":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}

    def validate(self) -> "JobParams":
        """Check every value; raise InputError with one sentence naming the fix. Returns self."""
        _check_number("seconds", self.seconds, 0.1, MAX_SECONDS, "a length in seconds")
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_int("window", self.window, 1, MAX_WINDOW)
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_number("distilled_cfg", self.distilled_cfg, 1.0, 32.0, "a distilled CFG value")
        _check_number("cfg", self.cfg, 1.0, 32.0, "a CFG value")
        _check_number("cfg_rescale", self.cfg_rescale, 0.0, 1.0, "a CFG rescale value")
        _check_int("resolution", self.resolution, MIN_RESOLUTION, MAX_RESOLUTION)
        _check_int("crf", self.crf, 0, 51)
        if self.mode not in MODES:
            raise InputError(f"Mode must be one of {', '.join(MODES)}, not {self.mode!r}.")
        _check_number("keep_free_gb", self.keep_free_gb, 0.0, 128.0, "GPU memory to keep free, in GB")
        if self.memory_profile not in MEMORY_PROFILES:
            raise InputError(f"Memory profile must be one of {', '.join(MEMORY_PROFILES)}, not {self.memory_profile!r}.")
        if self.sampler not in SAMPLERS:
            raise InputError(f"Sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}.")
        if self.cache not in CACHE_MODES:
            raise InputError(f"The step cache must be one of {', '.join(CACHE_MODES)}, not {self.cache!r}.")
        if self.cache_threshold is not None:
            _check_number("cache_threshold", self.cache_threshold, 0.0, 1.0, "a step cache threshold")
        _check_int("cache_max_skip", self.cache_max_skip, 1, MAX_STEPS)
        _check_number("cache_retention", self.cache_retention, 0.0, 1.0, "the share of first steps never skipped")
        if self.attention not in ATTENTION_BACKENDS:
            raise InputError(f"The attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"not {self.attention!r}.")
        if not isinstance(self.drift_report, bool):
            raise InputError(f"drift_report must be true or false, not {self.drift_report!r}.")
        if self.color_correction not in COLOR_CORRECTIONS:
            raise InputError(f"Colour correction must be one of {', '.join(COLOR_CORRECTIONS)}, "
                             f"not {self.color_correction!r}.")
        _check_number("color_strength", self.color_strength, 0.0, 1.0, "the colour correction's strength")
        _check_int("auto_retry", self.auto_retry, 0, MAX_RETRIES)
        _check_number("retry_threshold", self.retry_threshold, 0.0, 2.0, "a drop of the similarity to the start")
        _check_number("retry_sharpness_drop", self.retry_sharpness_drop, 0.0, 1.0, "a share of the sharpness lost")
        _check_number("retry_seam_jump", self.retry_seam_jump, 0.0, 255.0, "a seam jump in 0-255 levels")
        self._validate_storyboard()
        self._validate_loras()
        if self.end_image and self.mode != "inverted":
            raise InputError("An end image only works in inverted anti-drift mode; switch the mode or drop the end image.")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InputError("The prompt and negative prompt must be text.")
        if not self.image:
            raise InputError("No start image was given; choose a photo to animate.")
        return self

    def _validate_storyboard(self) -> None:
        """Shapes and types; times against the video's sections are checked by the section plan."""
        for name, what, kind in (("timed_prompts", "prompt", str), ("keyframes", "image", str)):
            entries = getattr(self, name)
            if not isinstance(entries, tuple):
                raise InputError(f"{name} must be a list of (seconds, {what}) pairs.")
            if len(entries) > MAX_STORYBOARD:
                raise InputError(f"At most {MAX_STORYBOARD} {what}s fit in one storyboard, not {len(entries)}.")
            for entry in entries:
                if not (isinstance(entry, tuple) and len(entry) == 2 and _is_real(entry[0])
                        and isinstance(entry[1], kind)):
                    raise InputError(f"Each entry of {name} must be a (seconds, {what}) pair, not {entry!r}.")
                if name == "keyframes" and not entry[1]:
                    raise InputError(f"The keyframe at {entry[0]:g} s has no image; choose one or remove the row.")
        _check_int("prompt_blend", self.prompt_blend, 0, 16)

    def _validate_loras(self) -> None:
        """Shapes and weights; the files themselves are read and checked by the engine (weights/lora.py)."""
        if not isinstance(self.loras, tuple):
            raise InputError("loras must be a list of (file, weight) pairs.")
        if len(self.loras) > MAX_LORAS:
            raise InputError(f"At most {MAX_LORAS} LoRAs can be used at once, not {len(self.loras)}.")
        lo, hi = LORA_WEIGHT_RANGE
        for entry in self.loras:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]
                    and _is_real(entry[1])):
                raise InputError(f"Each LoRA must be a (file, weight) pair with a number as weight, not {entry!r}.")
            if not lo <= entry[1] <= hi:
                raise InputError(f"The weight of the LoRA {Path(entry[0]).name} must be between {lo:g} and {hi:g}; "
                                 f"{entry[1]:g} is out of range.")

    @property
    def sorted_keyframes(self) -> tuple:
        return tuple(sorted(self.keyframes, key=lambda kv: kv[0]))

    @property
    def prompts(self) -> list[str]:
        """The base prompt, then each timed prompt (the storyboard's prompt indices)."""
        return [self.prompt] + [text for _, text in self.timed_prompts]

    @property
    def has_storyboard(self) -> bool:
        return bool(self.timed_prompts or self.keyframes)

    @property
    def uses_real_cfg(self) -> bool:
        # Real CFG doubles the transformer calls; with cfg == 1 the negative pass is skipped entirely.
        return self.cfg > 1.0

    @property
    def models_path(self) -> Path:
        return Path(self.models)

    @property
    def outputs_path(self) -> Path:
        return Path(self.outputs)


def speed_of(settings: dict) -> str | None:
    """The Speed preset these step cache settings are, or None for custom ones."""
    if settings.get("cache") == "off":
        return "off"
    for name, preset in SPEED_PRESETS.items():
        threshold = settings.get("cache_threshold")
        if name != "off" and settings.get("cache") == preset["cache"] and (
                preset["cache_threshold"] == (CACHE_DEFAULT_THRESHOLD["mag"] if threshold is None else threshold)) and all(
                settings.get(k) == preset[k] for k in ("cache_max_skip", "cache_retention")):
            return name
    return None


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(name: str, value, lo: float, hi: float, what: str) -> None:
    if not _is_real(value):
        raise InputError(f"{name} must be a number between {lo:g} and {hi:g}, not {value!r}.")
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo:g} and {hi:g} ({what}); {value:g} is out of range.")


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be a whole number between {lo} and {hi}, not {value!r}.")
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}; {value} is out of range.")
