"""The model download in the background: the page starts it and polls its progress."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from ..errors import FramePackError

logger = logging.getLogger(__name__)

class DownloadManager:
    """Runs weights.download.download_models on a thread; the page polls its state."""

    def __init__(self, hub: Any = None) -> None:
        self._hub = hub
        self._lock = threading.Lock()
        self.progress = None
        self.error: str | None = None
        self.running = False
        self.finished = False
        self.version = 0
        self._thread: threading.Thread | None = None

    def start(self, models_dir: Path, variant: str = "inverted") -> bool:
        with self._lock:
            if self.running:
                return False
            self.running, self.finished, self.error, self.progress = True, False, None, None
            self.version += 1
            self._thread = threading.Thread(target=self._run, args=(Path(models_dir), variant),
                                            name="framepack-download", daemon=True)
            self._thread.start()
        return True

    def _on_progress(self, progress) -> None:
        with self._lock:
            self.progress = progress
            self.version += 1

    def _run(self, models_dir: Path, variant: str) -> None:
        from ..weights.download import download_models

        error = None
        try:
            download_models(models_dir, variant, on_progress=self._on_progress, hub=self._hub)
        except FramePackError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - one sentence, never a traceback in the page
            logger.exception("model download failed")
            error = f"The download failed unexpectedly ({type(exc).__name__}); run it again to resume."
        with self._lock:
            self.running, self.error, self.finished = False, error, error is None
            self.version += 1

    def snapshot(self) -> tuple[Any, bool, str | None, bool, int]:
        with self._lock:
            return self.progress, self.running, self.error, self.finished, self.version

    def wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
