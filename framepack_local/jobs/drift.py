"""Drift metrics of any video: per-frame measurements and the paper's start-end contrast (FramePack §4).

Per frame: sharpness (variance of the Laplacian of the grey image, a clarity proxy), colour (mean and
spread in CIELAB, and the CIEDE2000 distance of the mean colour from the first frame's), and temporal
change (mean absolute difference to the previous frame, a motion proxy). Optionally an appearance
similarity (cosine of image embeddings to the start image) on a few frames, one per section.
For each metric M the start-end contrast is Delta = |M(first 15% of frames) - M(last 15%)|, and the jump
of the temporal change at each section seam shows the "pulse" between sections.

Frames stream through one at a time (nothing holds the whole video). numpy + scikit-image for the maths,
matplotlib (Agg) for the chart, both imported inside the functions that use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

EDGE_SHARE = 0.15  # the paper's start-end contrast compares the first and last 15% of frames
# Colour statistics are taken on a strided copy no longer than this on its long side: means and spreads
# of a 640 px frame barely change, and the Lab conversion is the costliest step per frame.
COLOUR_SIDE = 160
DEFAULT_SECTION_FRAMES = 36  # FramePack's default window 9 makes 4*9 new frames per section
DRIFT_JSON = "drift.json"
DRIFT_CHART = "drift.png"
PER_FRAME = ("sharpness", "lightness", "a", "b", "spread", "delta_e", "motion")
Embedder = Callable[[np.ndarray], np.ndarray]  # (H, W, 3) uint8 -> unit-length embedding


def sharpness(frame_hwc: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image (values 0-1): high for crisp detail, near 0 when blurred."""
    from skimage import color, filters

    grey = color.rgb2gray(frame_hwc)
    return float(np.var(filters.laplace(grey)))


def lab_stats(frame_hwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of L*, a*, b* over the frame (strided to COLOUR_SIDE)."""
    from skimage import color

    step = max(1, math.ceil(max(frame_hwc.shape[:2]) / COLOUR_SIDE))
    lab = color.rgb2lab(frame_hwc[::step, ::step]).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


def delta_e(lab_a: np.ndarray, lab_b: np.ndarray) -> float:
    from skimage import color

    return float(color.deltaE_ciede2000(np.asarray(lab_a, float), np.asarray(lab_b, float)))


def section_spans(frames: int, section_frames: int) -> list[tuple[int, int]]:
    """Frame ranges of the sections in time order: the first holds the start frame plus one section
    (FramePack videos have 4*w*n + 1 frames); the last may be short in a foreign video."""
    spans, start, end = [], 0, min(frames, section_frames + 1)
    while start < frames:
        spans.append((start, end))
        start, end = end, min(frames, end + section_frames)
    return spans


def seams_of(frames: int, section_frames: int) -> list[int]:
    """The first frame of every section after the first: where neighbouring sections meet."""
    return [start for start, _ in section_spans(frames, section_frames)[1:]]


def _nan_mean(values) -> float | None:
    arr = np.asarray(values, float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def edge_means(values: np.ndarray) -> tuple[float | None, float | None]:
    """M(first 15%) and M(last 15%) of a per-frame series (NaN = not measured there); at least one frame each.
    A series measured on a few frames only (similarity) falls back to its first and last measured value."""
    values = np.asarray(values, float)
    n = len(values)
    k = max(1, int(math.ceil(n * EDGE_SHARE)))
    first, last = _nan_mean(values[:k]), _nan_mean(values[n - k:])
    measured = values[np.isfinite(values)]
    if measured.size:
        first = float(measured[0]) if first is None else first
        last = float(measured[-1]) if last is None else last
    return first, last


def contrast(values: np.ndarray) -> float | None:
    first, last = edge_means(values)
    return None if first is None or last is None else abs(first - last)


def seam_jumps(motion: np.ndarray, seams: list[int], section_frames: int) -> list[float]:
    """Per seam: its temporal change minus the median change of the frames around it (same units, 0-255
    levels). Zero for a steady video; large where the picture jumps as one section meets the next."""
    half = max(2, section_frames // 2)
    jumps = []
    for s in seams:
        around = np.concatenate([motion[max(1, s - half):s], motion[s + 1:s + 1 + half]])
        around = around[np.isfinite(around)]
        base = float(np.median(around)) if around.size else 0.0
        jumps.append(float(motion[s]) - base)
    return jumps


@dataclass
class DriftMeter:
    """Measures frames in time order, one at a time; `report()` gives the summary and the series."""

    fps: float = 30.0
    embed: Embedder | None = None  # appearance similarity, on the frames in `similarity_at`
    reference_embedding: np.ndarray | None = None  # of the start image; None: the first frame's
    similarity_at: set[int] = field(default_factory=set)
    series: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in PER_FRAME})
    similarity: dict[int, float] = field(default_factory=dict)
    _first_lab: np.ndarray | None = None
    _previous: np.ndarray | None = None

    @property
    def frames(self) -> int:
        return len(self.series["sharpness"])

    def add(self, frame_hwc: np.ndarray) -> None:
        index = self.frames
        mean, spread = lab_stats(frame_hwc)
        if self._first_lab is None:
            self._first_lab = mean
        s = self.series
        s["sharpness"].append(sharpness(frame_hwc))
        s["lightness"].append(float(mean[0]))
        s["a"].append(float(mean[1]))
        s["b"].append(float(mean[2]))
        s["spread"].append(float(spread[0]))  # contrast: the spread of lightness
        s["delta_e"].append(delta_e(mean, self._first_lab))
        current = frame_hwc.astype(np.int16)
        s["motion"].append(math.nan if self._previous is None else float(np.abs(current - self._previous).mean()))
        self._previous = current
        if self.embed is not None and (index in self.similarity_at or (index == 0 and self.reference_embedding is None)):
            vector = self.embed(frame_hwc)
            if self.reference_embedding is None:
                self.reference_embedding = vector
            if index in self.similarity_at:
                self.similarity[index] = float(np.dot(vector, self.reference_embedding))

    def add_all(self, frames: Iterable[np.ndarray]) -> "DriftMeter":
        for frame in frames:
            self.add(frame)
        return self

    def report(self, section_frames: int, source: str = "") -> dict:
        n = self.frames
        arrays = {k: np.asarray(v, float) for k, v in self.series.items()}
        sim = np.full(n, math.nan)
        for i, v in self.similarity.items():
            sim[i] = v
        seams = seams_of(n, section_frames)
        jumps = seam_jumps(arrays["motion"], seams, section_frames)
        per_metric = {"sharpness": arrays["sharpness"], "color": arrays["delta_e"], "motion": arrays["motion"],
                      "similarity": sim if self.similarity else None}
        start, end, delta = {}, {}, {}
        for name, values in per_metric.items():
            first, last = edge_means(values) if values is not None else (None, None)
            start[name], end[name] = first, last
            delta[name] = None if first is None or last is None else abs(first - last)
        return {
            "source": source, "frames": n, "fps": self.fps, "seconds": n / self.fps if self.fps else None,
            "section_frames": section_frames, "edge_share": EDGE_SHARE,
            "delta": delta, "start": start, "end": end,
            "sharpness_ratio": (end["sharpness"] / start["sharpness"]) if start["sharpness"] else None,
            "seams": seams,
            "seam_jump": {"mean": _nan_mean(jumps) or 0.0, "max": max(jumps) if jumps else 0.0,
                          "at": seams[int(np.argmax(jumps))] if jumps else None, "per_seam": jumps},
            "per_frame": {k: [None if not math.isfinite(x) else x for x in v] for k, v in self.series.items()},
            "similarity": [{"frame": i, "value": v} for i, v in sorted(self.similarity.items())],
        }


def summary(report: dict) -> dict:
    """What job.json keeps: the figures, not the per-frame series (those stay in drift.json)."""
    jump = report["seam_jump"]
    return {"delta": report["delta"], "start": report["start"], "end": report["end"],
            "sharpness_ratio": report["sharpness_ratio"],
            "seam_jump": {k: jump[k] for k in ("mean", "max", "at")}, "frames": report["frames"],
            "json": DRIFT_JSON, "chart": DRIFT_CHART}


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def table(report: dict) -> str:
    """The start-end contrast as a plain-text table (the CLI prints it)."""
    units = {"sharpness": "Laplacian variance", "color": "CIEDE2000 from frame 0", "motion": "mean |frame diff|, 0-255",
             "similarity": "SigLIP cosine to the start"}
    rows = [f"{'metric':<11} {'first 15%':>11} {'last 15%':>11} {'delta':>11}  unit"]
    for name, unit in units.items():
        rows.append(f"{name:<11} {_fmt(report['start'][name]):>11} {_fmt(report['end'][name]):>11} "
                    f"{_fmt(report['delta'][name]):>11}  {unit}")
    jump = report["seam_jump"]
    rows.append(f"seam jump: mean {_fmt(jump['mean'])}, max {_fmt(jump['max'])}"
                + (f" at frame {jump['at']}" if jump["at"] is not None else "")
                + f" ({len(report['seams'])} seams, every {report['section_frames']} frames)")
    return "\n".join(rows)


def write_chart(report: dict, path: Path) -> Path:
    """Metrics over time with the seams marked and the compared first/last 15% shaded (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global figure state, safe in a worker thread

    fps = report["fps"] or 30.0
    n = report["frames"]
    t = np.arange(n) / fps
    panels = [("sharpness", "sharpness"), ("delta_e", "colour ΔE"), ("motion", "motion")]
    has_sim = bool(report["similarity"])
    fig = Figure(figsize=(8, 1.8 * (len(panels) + has_sim)), dpi=90)
    axes = fig.subplots(len(panels) + has_sim, 1, sharex=True, squeeze=False)[:, 0]
    k = max(1, int(math.ceil(n * EDGE_SHARE)))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(t, np.asarray(report["per_frame"][key], float), lw=1)
        ax.set_ylabel(label)
    if has_sim:
        frames = [s["frame"] for s in report["similarity"]]
        axes[-1].plot(np.asarray(frames) / fps, [s["value"] for s in report["similarity"]], "o-", ms=3, lw=1)
        axes[-1].set_ylabel("similarity")
    for ax in axes:
        for s in report["seams"]:
            ax.axvline(s / fps, color="grey", lw=0.5, alpha=0.5)
        ax.axvspan(0, k / fps, color="green", alpha=0.08)
        ax.axvspan((n - k) / fps, n / fps, color="red", alpha=0.08)
    axes[-1].set_xlabel("seconds (grey lines: section seams; shaded: first and last 15%)")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path
