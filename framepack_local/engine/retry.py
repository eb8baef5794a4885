"""Self-correcting sections (README "Drift"): score a decoded section, re-sample it when it drifted.

After a section is decoded, three scores compare it with the sections before it:
- similarity: cosine of its middle frame's SigLIP embedding to the start image's (a face that changes);
- sharpness: variance of the Laplacian over its frames (a collapse into blur);
- seam jump: the picture change where it meets its finished neighbour, minus its own typical change
  from frame to frame (a "pulse" between sections), in 0-255 levels.
A section fails when it is worse than the mean of the sections already kept by more than a threshold on
any score; it is then sampled again with noise from a generator seeded by (seed, section, attempt),
at most N times, and the best attempt is kept. The thresholds are provisional: without the real
weights nobody has tuned them, so they are options.

Pure scoring and judging; the engine runs the attempts (engine/generate.py) and records them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..jobs.drift import sharpness
from ..params import JobParams

# Provisional defaults (untuned, see the module docstring; they live in JobParams): a drop of the cosine
# similarity by 0.05, a loss of half the sharpness, or a seam jump 8 levels above the usual are "drifted".
DEFAULT_SIMILARITY_DROP = JobParams.retry_threshold
DEFAULT_SHARPNESS_DROP = JobParams.retry_sharpness_drop
DEFAULT_SEAM_JUMP = JobParams.retry_seam_jump
SHARPNESS_FRAMES = 3  # frames per section measured for sharpness: first, middle, last new frame


def attempt_seed(seed: int, section: int, attempt: int) -> int:
    """The noise seed of a re-sample: a hash of (job seed, section number, attempt), stable across
    machines and Python versions (attempt 0 is the job's own generator, not this)."""
    digest = hashlib.sha256(f"framepack-local retry {seed} {section} {attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)


@dataclass(frozen=True)
class Thresholds:
    similarity: float = DEFAULT_SIMILARITY_DROP
    sharpness: float = DEFAULT_SHARPNESS_DROP
    seam: float = DEFAULT_SEAM_JUMP


def _uint8(frame_hwc: torch.Tensor) -> np.ndarray:
    return (frame_hwc.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def seam_jump(decoded_thwc: torch.Tensor, new: slice, inverted: bool) -> float | None:
    """Change across the boundary between the section's new frames and its neighbour's re-decoded edge,
    minus the median change between the new frames themselves (levels 0-255). None for the first decode."""
    total = decoded_thwc.shape[0]
    start, stop, _ = new.indices(total)
    if start == 0 and stop == total:
        return None
    boundary = stop if inverted else start  # the first frame past the new ones (inverted) or the first new one
    if boundary <= 0 or boundary >= total:
        return None
    frames = decoded_thwc.float() * 255.0
    across = float((frames[boundary] - frames[boundary - 1]).abs().mean())
    inside = frames[start:stop]
    steps = (inside[1:] - inside[:-1]).abs().flatten(1).mean(dim=1) if inside.shape[0] > 1 else torch.zeros(1)
    return across - float(steps.median())


def score(decoded_thwc: torch.Tensor, new: slice, inverted: bool, embed, reference: np.ndarray | None) -> dict:
    """The three scores of one decoded section (engine units: see the module docstring)."""
    frames = decoded_thwc[new]
    picks = sorted({0, frames.shape[0] // 2, frames.shape[0] - 1})[:SHARPNESS_FRAMES]
    scores = {"sharpness": float(np.mean([sharpness(_uint8(frames[i])) for i in picks])),
              "seam_jump": seam_jump(decoded_thwc, new, inverted), "similarity": None}
    if embed is not None and reference is not None:
        scores["similarity"] = float(np.dot(embed(_uint8(frames[frames.shape[0] // 2])), reference))
    return scores


def _mean(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if h.get(key) is not None]
    return float(np.mean(values)) if values else None


def badness(scores: dict, history: list[dict], limits: Thresholds) -> dict[str, float]:
    """Per score, how far past its threshold the section is compared with the kept sections before it
    (> 1 fails). No history, no judgement: the first section is never retried."""
    out = {}
    base = _mean(history, "similarity")
    if base is not None and scores.get("similarity") is not None:
        out["similarity"] = (base - scores["similarity"]) / max(limits.similarity, 1e-9)
    base = _mean(history, "sharpness")
    if base and scores.get("sharpness") is not None:
        out["sharpness"] = (1.0 - scores["sharpness"] / base) / max(limits.sharpness, 1e-9)
    base = _mean(history, "seam_jump")
    if scores.get("seam_jump") is not None:
        out["seam_jump"] = (scores["seam_jump"] - (base or 0.0)) / max(limits.seam, 1e-9)
    return out


def fails(margins: dict[str, float]) -> list[str]:
    """The scores past their threshold (empty: the section passes)."""
    return sorted(name for name, value in margins.items() if value > 1.0)


def worst(margins: dict[str, float]) -> float:
    return max(margins.values(), default=float("-inf"))


class SectionJudge:
    """One job's retry bookkeeping: scores each attempt, says when to stop, picks the best, and keeps
    the record a resume continues from (`kept`: the kept attempt's scores per finished section;
    `retries`: every section that was re-sampled, with all its attempts)."""

    def __init__(self, limits: Thresholds, embed, reference: np.ndarray | None, kept: list | None = None,
                 retries: list | None = None) -> None:
        self.limits, self.embed, self.reference = limits, embed, reference
        self.kept = list(kept or [])
        self.retries = list(retries or [])
        self.attempts: list[dict] = []

    @classmethod
    def for_job(cls, params, embed, reference, record: dict, done: int) -> "SectionJudge | None":
        if not params.auto_retry:
            return None
        limits = Thresholds(params.retry_threshold, params.retry_sharpness_drop, params.retry_seam_jump)
        retries = [r for r in record.get("retries") or [] if r["section"] < done]
        return cls(limits, embed, reference, (record.get("section_scores") or [])[:done], retries)

    def check(self, section: int, attempt: int, seed: int | None, decoded_thwc: torch.Tensor, new: slice,
              inverted: bool) -> bool:
        """Score one attempt; True when it passes (no more attempts needed)."""
        scores = score(decoded_thwc, new, inverted, self.embed, self.reference)
        margins = badness(scores, self.kept, self.limits)
        failed = fails(margins)
        self.attempts.append({"attempt": attempt, "seed": seed, "scores": scores,
                              "margins": margins, "failed": failed})
        return not failed

    def choose(self) -> int:
        """The attempt to keep: the first that passed, else the least bad one (the earliest on a tie)."""
        for i, a in enumerate(self.attempts):
            if not a["failed"]:
                return i
        return min(range(len(self.attempts)), key=lambda i: worst(self.attempts[i]["margins"]))

    def commit(self, section: int, chosen: int) -> str | None:
        """Record the section's outcome; returns the Notice sentence when it was re-sampled."""
        attempts, self.attempts = self.attempts, []
        self.kept.append(attempts[chosen]["scores"])
        if len(attempts) == 1:
            return None
        self.retries.append({"section": section, "kept": chosen, "attempts": attempts})
        why = ", ".join(attempts[0]["failed"]) or "drift"
        verdict = "it passed" if not attempts[chosen]["failed"] else "none passed, the least drifted one is kept"
        return (f"Section {section + 1} drifted ({why} past its threshold); it was sampled {len(attempts) - 1} more "
                f"time{'s' if len(attempts) > 2 else ''} with new noise and attempt {chosen + 1} is kept ({verdict}).")
