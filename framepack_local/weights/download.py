"""Download the real weights into a model folder, with sizes up front, resume and byte progress.

The plan is pure (`download_plan`, `plan_files`) and tested offline with the known repository
layouts; only `download_models` talks to the hub. First-run downloads without progress are one of
the most reported complaints about the existing tools (DESIGN.md section 1), so the total size is
reported before the first byte, files already complete are skipped, interrupted files resume, and
an unreachable hub fails within seconds with one sentence instead of retrying forever.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import DownloadError
from .model_folder import MODE_PARTS, PARTS, SHARED_PARTS, missing_parts

logger = logging.getLogger(__name__)

VARIANT_MODES: dict[str, tuple[str, ...]] = {
    "inverted": ("inverted",),
    "forward": ("forward",),
    "both": ("inverted", "forward"),
}

# Only safetensors weights (and their shard index), configs and tokenizer files. Matched against a
# file's name inside its folder. Pickle formats are never fetched: the app loads safetensors only.
ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "*_config.json",  # tokenizer_config, preprocessor_config, generation_config
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
IGNORE_PATTERNS: tuple[str, ...] = (
    "*.bin",
    "*.bin.index.json",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.msgpack",
    "*.h5",
    "*.onnx",
    "*.onnx_data",
    "*.tflite",
    "*.ot",
    "*.gguf",
    "*.pkl",
)

# Timeouts for talking to the hub. The metadata call is also bounded by a wall-clock deadline in a
# helper thread, because name resolution (getaddrinfo) ignores socket timeouts and can hang for
# minutes on a broken network.
METADATA_TIMEOUT_S = 10.0
METADATA_DEADLINE_S = 15.0
ETAG_TIMEOUT_S = 10.0
PROGRESS_INTERVAL_S = 0.25
SPEED_WINDOW_S = 10.0
STAGING_DIR = Path(".cache") / "download"


@dataclass(frozen=True)
class DownloadItem:
    repo_id: str
    subfolder: str | None  # folder inside the repository; None = repository root
    target: str  # our subfolder in the model folder


@dataclass(frozen=True)
class DownloadProgress:
    bytes_done: int  # including files that were already complete on disk
    bytes_total: int
    bytes_per_second: float  # recent transfer speed; 0.0 before the first byte
    eta_seconds: float | None  # None while the speed is unknown
    files_done: int
    files_total: int
    current_file: str | None  # local relative path being downloaded
    finished: bool = False

    @property
    def fraction(self) -> float:
        return 1.0 if self.bytes_total <= 0 else min(1.0, self.bytes_done / self.bytes_total)


def download_plan(variant: str) -> list[DownloadItem]:
    """What to fetch for `variant` ("inverted", "forward" or "both"): shared parts, then transformers."""
    if variant not in VARIANT_MODES:
        raise ValueError(f"Unknown model variant {variant!r}; expected one of {sorted(VARIANT_MODES)}")
    names = list(SHARED_PARTS) + [MODE_PARTS[mode] for mode in VARIANT_MODES[variant]]
    return [DownloadItem(PARTS[n].repo_id, PARTS[n].repo_subfolder, PARTS[n].subfolder) for n in names]


def _wanted(filename: str) -> bool:
    if any(fnmatch.fnmatch(filename, pattern) for pattern in IGNORE_PATTERNS):
        return False
    return any(fnmatch.fnmatch(filename, pattern) for pattern in ALLOW_PATTERNS)


def plan_files(item: DownloadItem, repo_files: list[str]) -> list[tuple[str, str]]:
    """(repo path, local relative path) for the files of `item` among `repo_files` worth fetching.

    Only the direct children of the item's folder are taken: the HunyuanVideo repository also holds
    a 13B text-to-video transformer and other folders we must not download.
    """
    planned: list[tuple[str, str]] = []
    prefix = f"{item.subfolder.strip('/')}/" if item.subfolder else ""
    for repo_path in sorted(repo_files):
        if not repo_path.startswith(prefix):
            continue
        name = repo_path[len(prefix):]
        if not name or "/" in name or not _wanted(name):
            continue
        planned.append((repo_path, f"{item.target}/{name}"))
    return planned


# --------------------------------------------------------------------------------------------
# Hub access, behind a small interface so the download loop is testable without a network.
# --------------------------------------------------------------------------------------------


class HubClient(Protocol):
    def list_files(self, repo_id: str) -> tuple[str, dict[str, int]]:
        """Return (revision, {repo path: size in bytes}) for every file of the repository."""

    def fetch(self, repo_id: str, revision: str, repo_path: str, staging_dir: Path, tqdm_class: type) -> Path:
        """Download one file (resuming a partial one) under `staging_dir` and return its path."""


def _call_with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    worker = threading.Thread(target=run, name="framepack-hub-metadata", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class HuggingFaceHub:
    """The real hub through huggingface_hub (httpx; Xet storage when hf_xet is installed)."""

    def list_files(self, repo_id: str) -> tuple[str, dict[str, int]]:
        from huggingface_hub import HfApi

        def ask():
            return HfApi().model_info(repo_id, files_metadata=True, timeout=METADATA_TIMEOUT_S)

        info = _call_with_deadline(ask, METADATA_DEADLINE_S)
        sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
        return info.sha, sizes

    def fetch(self, repo_id: str, revision: str, repo_path: str, staging_dir: Path, tqdm_class: type) -> Path:
        from huggingface_hub import hf_hub_download

        # local_dir keeps partial data in staging_dir/.cache/huggingface/download/*.incomplete and
        # resumes it with an HTTP Range request on the next attempt.
        path = hf_hub_download(
            repo_id,
            repo_path,
            revision=revision,
            local_dir=staging_dir,
            etag_timeout=ETAG_TIMEOUT_S,
            tqdm_class=tqdm_class,
        )
        return Path(path)


# --------------------------------------------------------------------------------------------
# Progress accounting.
# --------------------------------------------------------------------------------------------


class _ProgressTracker:
    """Aggregates per-file byte counts into DownloadProgress events (callbacks may come from threads)."""

    def __init__(self, bytes_total: int, bytes_done: int, files_total: int, files_done: int, on_progress):
        self._lock = threading.Lock()
        self._on_progress = on_progress
        self.bytes_total = bytes_total
        self._bytes_finished = bytes_done  # complete files (skipped or downloaded)
        self._current_bytes = 0  # bytes of the file being downloaded, resumed part included
        self._transferred = 0  # bytes received in this session, for the speed
        self.files_total = files_total
        self.files_done = files_done
        self.current_file: str | None = None
        self._samples: deque[tuple[float, int]] = deque()
        self._last_emit = 0.0

    def _speed(self, now: float) -> float:
        self._samples.append((now, self._transferred))
        while len(self._samples) > 2 and now - self._samples[0][0] > SPEED_WINDOW_S:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        return (self._transferred - b0) / (now - t0) if now > t0 else 0.0

    def _snapshot(self, finished: bool = False) -> DownloadProgress:
        now = time.monotonic()
        speed = self._speed(now)
        done = self._bytes_finished + self._current_bytes
        eta = (self.bytes_total - done) / speed if speed > 0 else None
        return DownloadProgress(
            bytes_done=done,
            bytes_total=self.bytes_total,
            bytes_per_second=speed,
            eta_seconds=0.0 if finished else eta,
            files_done=self.files_done,
            files_total=self.files_total,
            current_file=None if finished else self.current_file,
            finished=finished,
        )

    def emit(self, force: bool = False, finished: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_emit < PROGRESS_INTERVAL_S:
                return
            self._last_emit = now
            event = self._snapshot(finished)
        if self._on_progress is not None:
            self._on_progress(event)

    def start_file(self, local_rel: str) -> None:
        with self._lock:
            self.current_file = local_rel
            self._current_bytes = 0
        self.emit(force=True)

    def add(self, num_bytes: int, transferred: bool) -> None:
        with self._lock:
            self._current_bytes += num_bytes
            if transferred:
                self._transferred += num_bytes
        self.emit(force=not transferred)  # a resumed part shows at once

    def finish_file(self, size: int) -> None:
        with self._lock:
            self._bytes_finished += size
            self._current_bytes = 0
            self.files_done += 1
        self.emit(force=True)

    def tqdm_class(self) -> type:
        """A silent tqdm subclass whose byte updates land in this tracker."""
        from huggingface_hub.utils import tqdm as hf_tqdm

        tracker = self

        class _TrackerTqdm(hf_tqdm):
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)
                initial = int(kwargs.get("initial") or 0)
                if initial:  # bytes resumed from an earlier, interrupted download
                    tracker.add(initial, transferred=False)

            def update(self, n=1):
                if n:
                    tracker.add(int(n), transferred=True)

            # huggingface_hub routes Xet network counters here when present; file bytes via update().
            def update_transfer(self, n=1):
                pass

            def set_transfer_postfix_str(self, *args, **kwargs):
                pass

        return _TrackerTqdm


# --------------------------------------------------------------------------------------------
# The download.
# --------------------------------------------------------------------------------------------


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # The reason sits inside the user's one sentence: no full stops that would split it.
    text = text.rstrip(".").replace(". ", ", ")
    return text if len(text) <= 120 else text[:117] + "..."


def _unreachable(exc: BaseException, models_dir: Path) -> DownloadError:
    return DownloadError(
        f"Could not reach the Hugging Face hub to download the models ({_short_reason(exc)}); "
        f"check your internet connection or copy an existing model folder to {models_dir}."
    )


def _as_download_error(exc: BaseException, models_dir: Path, repo_id: str) -> DownloadError:
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, OfflineModeIsEnabled):
        return DownloadError(
            "Could not reach the Hugging Face hub to download the models (offline mode is on because "
            f"HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE or copy an existing model folder to {models_dir}."
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DownloadError(
            f"The disk holding {models_dir} ran full while downloading the models; "
            "free some space and run the download again to resume."
        )
    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)):
        return DownloadError(
            f"The Hugging Face hub refused to serve {repo_id} ({_short_reason(exc)}); check that you can open "
            f"https://huggingface.co/{repo_id} in a browser, or copy an existing model folder to {models_dir}."
        )
    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if status is not None and status < 500 and status not in (408, 429):
            return DownloadError(
                f"The Hugging Face hub answered {repo_id} with an error ({_short_reason(exc)}); "
                f"try again later or copy an existing model folder to {models_dir}."
            )
    return _unreachable(exc, models_dir)


def _staging_dir(models_dir: Path, repo_id: str) -> Path:
    return models_dir / STAGING_DIR / repo_id.replace("/", "--")


def download_models(
    models_dir: Path,
    variant: str,
    *,
    on_progress: Callable[[DownloadProgress], None] | None = None,
    hub: HubClient | None = None,
) -> None:
    """Fetch the weights for `variant` into `models_dir`, skipping complete files and resuming partial ones.

    `on_progress` gets a DownloadProgress first with the total size (before any byte is fetched),
    then about four times a second and after every file; it may be called from a download thread.
    `hub` replaces the real hub (tests, mirrors). Raises DownloadError with one sentence.
    """
    models_dir = Path(models_dir)
    hub = hub or HuggingFaceHub()
    plan = download_plan(variant)

    # 1. Ask the hub for every repository's file list and sizes before touching the disk.
    revisions: dict[str, str] = {}
    listings: dict[str, dict[str, int]] = {}
    for repo_id in dict.fromkeys(item.repo_id for item in plan):
        try:
            revisions[repo_id], listings[repo_id] = hub.list_files(repo_id)
        except Exception as exc:  # every way the hub can fail must end in one sentence
            logger.debug("Listing %s failed: %s: %s", repo_id, type(exc).__name__, exc)
            raise _as_download_error(exc, models_dir, repo_id) from exc

    # 2. Resolve the files, their sizes, and what is already complete on disk.
    files: list[tuple[DownloadItem, str, str, int]] = []
    for item in plan:
        listing = listings[item.repo_id]
        for repo_path, local_rel in plan_files(item, list(listing)):
            files.append((item, repo_path, local_rel, listing[repo_path]))
    pending = []
    bytes_present = 0
    for item, repo_path, local_rel, size in files:
        final = models_dir / local_rel
        if final.is_file() and final.stat().st_size == size:
            bytes_present += size
        else:
            pending.append((item, repo_path, local_rel, size))
    bytes_total = sum(size for *_, size in files)
    bytes_needed = bytes_total - bytes_present
    logger.info(
        "Model download (%s) into %s: %d files, %.2f GB in total, %.2f GB already present, %.2f GB to fetch",
        variant, models_dir, len(files), bytes_total / 1e9, bytes_present / 1e9, bytes_needed / 1e9,
    )
    tracker = _ProgressTracker(bytes_total, bytes_present, len(files), len(files) - len(pending), on_progress)
    tracker.emit(force=True)

    if pending:
        try:
            models_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(models_dir).free
        except OSError as exc:
            raise DownloadError(
                f"Cannot create or use the model folder {models_dir} ({_short_reason(exc)}); choose a folder you can write to."
            ) from exc
        if bytes_needed > free:
            raise DownloadError(
                f"The models need about {bytes_needed / 1e9:.1f} GB more but only {free / 1e9:.1f} GB are free "
                f"on the disk holding {models_dir}; free some space or choose another model folder."
            )

    # 3. Fetch each missing file into the staging folder, then move it into the layout.
    tqdm_class = tracker.tqdm_class() if pending else None
    for item, repo_path, local_rel, size in pending:
        final = models_dir / local_rel
        tracker.start_file(local_rel)
        try:
            staged = hub.fetch(item.repo_id, revisions[item.repo_id], repo_path, _staging_dir(models_dir, item.repo_id), tqdm_class)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)  # same filesystem: atomic, no second copy of 26 GB
        except Exception as exc:  # network, hub or disk: all end in one sentence
            logger.debug("Downloading %s/%s failed: %s: %s", item.repo_id, repo_path, type(exc).__name__, exc)
            raise _as_download_error(exc, models_dir, item.repo_id) from exc
        if final.stat().st_size != size:
            raise DownloadError(
                f"The downloaded file {local_rel} has the wrong size; run the download again to fetch it anew."
            )
        tracker.finish_file(size)

    for repo_id in listings:
        shutil.rmtree(_staging_dir(models_dir, repo_id), ignore_errors=True)  # only resume metadata remains
    tracker.emit(force=True, finished=True)

    # 4. The listing could lack files we need (a renamed file upstream); say so instead of failing later.
    for mode in VARIANT_MODES[variant]:
        still_missing = missing_parts(models_dir, mode)
        if still_missing:
            raise DownloadError(
                f"After downloading, {models_dir} still lacks {', '.join(still_missing)}; "
                "the hub repositories may have changed, so please report this together with the log."
            )
    logger.info("Model download finished: %s", models_dir)
