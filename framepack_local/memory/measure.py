"""Memory measurement for tests and benchmarks: anonymous vs total resident memory, sampled peaks.

Anonymous memory (heap, tensors) is what the "fp8" and "disk" storages differ in; file-backed pages
of a memory-mapped checkpoint can be dropped by the OS and are counted apart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def anon_rss_bytes() -> int:
    """Anonymous resident memory of this process (RssAnon): heap and tensors, not mapped files.

    File-backed pages (a memory-mapped checkpoint, the page cache) are not counted: the OS can drop
    them, which is exactly the difference between the "fp8" and "disk" storages.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not Linux: total RSS is the closest portable number

    return psutil.Process().memory_info().rss


def rss_bytes() -> int:
    """Total resident memory of this process (anonymous + file-backed pages)."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """The largest total resident memory this process has had (the kernel's high-water mark)."""
    try:
        import resource
    except ImportError:  # Windows: the current value is the best portable number
        return rss_bytes()
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class PeakSampler:
    """Context manager sampling ``anon_rss_bytes`` in a thread every ``interval`` seconds.

    ``baseline`` is the value on entry, ``peak`` the largest sample (entry and exit included),
    ``growth`` their difference; ``peak_rss`` is the largest total RSS (mapped files included),
    sampled alongside when ``total`` is true.
    """

    def __init__(self, interval: float = 0.05, reader: Callable[[], int] = anon_rss_bytes, total: bool = False) -> None:
        self.interval = interval
        self.reader = reader
        self.total = total
        self.baseline = 0
        self.peak = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def _sample(self) -> None:
        self.peak = max(self.peak, self.reader())
        if self.total:
            self.peak_rss = max(self.peak_rss, rss_bytes())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self.baseline = self.peak = self.reader()
        self.peak_rss = rss_bytes() if self.total else 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="PeakSampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
