"""Typed events from the engine to whoever drives it (CLI, UI, worker), and the cancel token."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np

from .errors import Cancelled


@dataclass(frozen=True)
class JobStarted:
    job_id: str
    job_dir: Path
    sections: int
    steps: int
    frames: int
    height: int
    width: int


@dataclass(frozen=True)
class StageChanged:
    stage: str  # "load", "text", "image", "sampling", "decode", "write"
    message: str


@dataclass(frozen=True)
class Notice:
    """Something the user should know that is not an error (e.g. the prompt was truncated)."""

    message: str


@dataclass(frozen=True)
class StepProgress:
    section: int  # 1-based, in sampling order
    sections: int
    step: int  # 1-based
    steps: int
    elapsed_s: float
    preview_rgb: np.ndarray  # (H, W, 3) uint8 cheap latent preview of the current window
    computed: int | None = None  # steps of this section that ran the full transformer so far (step cache)


@dataclass(frozen=True)
class SectionFinished:
    section: int  # 1-based
    sections: int
    video_path: Path  # playable mp4 of the video so far
    frames: int  # frames in that mp4
    elapsed_s: float


@dataclass(frozen=True)
class JobFinished:
    status: str  # "done" or "stopped"
    job_dir: Path
    video_path: Path | None
    elapsed_s: float


Event = Union[JobStarted, StageChanged, Notice, StepProgress, SectionFinished, JobFinished]
EventHandler = Callable[[Event], None]


class CancelToken:
    """Set from any thread; the engine checks it every sampling step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("The job was stopped; the sections finished so far were kept.")
