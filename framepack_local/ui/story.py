"""The storyboard editor's rows <-> the storyboard in JobParams, and the section plan preview."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from ..engine import schedule, storyboard
from ..errors import FramePackError, InputError

STORY_ROWS = 6  # rows in the page; the CLI and the API take up to 64 entries
ROW_KINDS = ("at", "prompt", "image")
STORY_FIELDS = tuple(f"story_{kind}_{i}" for i in range(1, STORY_ROWS + 1) for kind in ROW_KINDS)


def rows_to_storyboard(values: dict) -> tuple[tuple, tuple]:
    """Rows (time, prompt, image) -> (timed_prompts, keyframes); one sentence for a row that cannot work."""
    prompts, keyframes = [], []
    for i in range(1, STORY_ROWS + 1):
        at = values.get(f"story_at_{i}")
        text = values.get(f"story_prompt_{i}") or ""
        if not isinstance(text, str):
            raise InputError(f"The prompt of storyboard row {i} must be text.")
        text = text.strip()
        image = values.get(f"story_image_{i}")
        if not text and not image:
            continue  # an empty row (a time alone says nothing)
        if at is None or at == "":
            raise InputError(f"Give storyboard row {i} a time in seconds: when its prompt or keyframe takes over.")
        try:
            seconds = float(at)
        except (TypeError, ValueError):
            raise InputError(f"The time of storyboard row {i} must be a number of seconds.") from None
        if not math.isfinite(seconds):
            raise InputError(f"The time of storyboard row {i} must be a finite number of seconds.")
        if text:
            if seconds == 0:
                raise InputError(f"Storyboard row {i} is at 0 s, where the main prompt applies; give it a later "
                                 f"time or put its text in the main prompt.")
            prompts.append((seconds, text))
        if image:
            keyframes.append((seconds, str(image)))
    return tuple(prompts), tuple(keyframes)


def storyboard_to_rows(params: dict, job_dir: Path | None) -> tuple[dict, int, int]:
    """A job record's storyboard -> row values, the rows in use, and how many entries did not fit."""
    by_time: dict[float, dict[str, Any]] = {}
    for at, text in params.get("timed_prompts") or ():
        by_time.setdefault(float(at), {})["prompt"] = text
    # The job folder keeps each keyframe cropped, numbered in time order; the upload may be gone.
    for i, (at, _path) in enumerate(sorted(params.get("keyframes") or (), key=lambda kv: kv[0]), 1):
        saved = job_dir / f"keyframe_{i:02d}.png" if job_dir is not None else None
        by_time.setdefault(float(at), {})["image"] = str(saved) if saved is not None and saved.is_file() else None
    rows = sorted(by_time.items())
    out: dict[str, Any] = {name: None for name in STORY_FIELDS}
    for i, (at, row) in enumerate(rows[:STORY_ROWS], 1):
        out[f"story_at_{i}"] = at
        out[f"story_prompt_{i}"] = row.get("prompt") or ""
        out[f"story_image_{i}"] = row.get("image")
    return out, min(len(rows), STORY_ROWS), max(0, len(rows) - STORY_ROWS)


PLAN_ROWS_IN_FULL = 40  # longer plans show runs of alike sections as one row (a 600 s job has 500 sections)


def plan_preview_html(seconds, window, mode, has_end_image: bool, prompt: str, blend, values: dict) -> str:
    """The section plan the form amounts to, or the sentence saying why it cannot work."""
    try:
        seconds, window, blend = float(seconds), int(window), int(blend or 0)
        prompts, keyframes = rows_to_storyboard(values)
        keyframes = tuple(sorted(keyframes, key=lambda kv: kv[0]))
        sections = schedule.section_count(seconds, window)
        plans = storyboard.plan_sections(sections, window, str(mode), has_end_image and mode == "inverted",
                                         [t for t, _ in prompts], [t for t, _ in keyframes], blend)
    except FramePackError as exc:
        return f'<div class="fpl-plan-error">⚠️ {html.escape(str(exc))}</div>'
    except (TypeError, ValueError):
        return '<div class="fpl-plan-error">Choose a length and a window size to see the section plan.</div>'
    names = (["photo"] + [f"key@{t:g}s" for t, _ in keyframes]
             + (["end frame"] if has_end_image and mode == "inverted" else []))
    table = storyboard.plan_table(plans, [prompt or ""] + [text for _, text in prompts], names,
                                  collapse_over=PLAN_ROWS_IN_FULL)
    return (f'<div class="fpl-plan-box" data-sections="{len(plans)}"><pre class="fpl-plan">'
            f"{html.escape(table)}</pre></div>")
