"""The storyboard (timed prompts, keyframe images) and the section plan it becomes (paper section 4.1, Fig. 2d).

Pure: ``plan_sections`` turns the storyboard into one description per section, in sampling order,
and the engine walks that list. With one prompt and no keyframes the plan is exactly today's
inverted/forward layout.

Times snap to section boundaries: boundary b is the start of section b in video order, at
``b * 4 * window / 30`` seconds.

Keyframes (inverted mode): keyframe 0 is the start photo, then the user's keyframes by time, then the
end frame if given. They cut the video into stretches; each stretch is filled as an inverted job
between a start image and an end frame would be: every section of the stretch has the stretch's own
first keyframe in the start slot (the anchor it converges to), the first section sampled in the
stretch has the next keyframe in its 1x slot (the endpoint, paper Fig. 2b), and the padding counts
down to the stretch's start. Stretches are sampled from the last to the first; the 2x/4x history
simply continues from the stretch after, so motion flows across the seam. The keyframe is not
inserted as an extra frame: both neighbouring stretches share it (one converges to it, the other
plans towards it), so the video keeps the length the user asked for.

Timed prompts: a section gets the prompt in force at its place in the video's time (not in sampling
order). With ``blend_sections`` = N, the N sections after a change move linearly from the old prompt to
the new one (weights 1/(N+1) ... N/(N+1)); how two prompts blend is ``encode.blend_text``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..jobs.store import KEYFRAME_IMAGE as KEYFRAME_FILE
from ..params import MAX_STORYBOARD
from . import schedule
from .schedule import SectionLayout




@dataclass(frozen=True)
class SectionPlan:
    number: int  # 0-based, sampling order
    video_index: int  # 0-based position in the video
    start_s: float  # where the section begins in the video
    end_s: float
    layout: SectionLayout  # indices; layout.use_end_image = the endpoint keyframe fills the 1x slot
    stretch: int
    anchor: int  # keyframe in the start slot (0 = the start photo)
    endpoint: int | None  # keyframe in the 1x slot (first section sampled in its stretch), else None
    image_keyframes: tuple[int, ...]  # keyframes whose SigLIP embeddings are averaged for this stretch
    prompt: int  # index into the prompt list (0 = the base prompt)
    prompt_from: int | None  # the previous prompt while blending, else None
    blend: float  # weight of `prompt` (1.0 = the prompt alone)


def section_seconds(window: int) -> float:
    return schedule.VAE_TEMPORAL * window / schedule.FPS


def boundary_of(seconds: float, window: int) -> int:
    """The section boundary nearest to a time; a time half way between two goes to the later one (not
    Python's round-half-to-even, and with a margin for float noise: 1.8 s and 3.0 s at window 9 are two
    boundaries apart, as they are 1.2 s apart)."""
    return int(math.floor(seconds / section_seconds(window) + 0.5 + 1e-9))


def _check_times(kind: str, times, sections: int, window: int) -> None:
    length = schedule.total_frames(sections, window) / schedule.FPS
    if len(times) > MAX_STORYBOARD:
        raise InputError(f"At most {MAX_STORYBOARD} {kind}s fit in one storyboard, not {len(times)}.")
    for t in times:
        if not (0.0 <= t <= length):
            raise InputError(f"The {kind} at {t:g} s is outside the {length:.1f} s video; "
                             f"give it a time between 0 and {length:.1f} s.")


def keyframe_boundaries(times, sections: int, window: int) -> list[int]:
    """Section boundary of each keyframe (sorted input); one sentence when one cannot be a keyframe."""
    _check_times("keyframe", times, sections, window)
    seen: dict[int, float] = {}
    out = []
    step = section_seconds(window)
    for t in times:
        b = boundary_of(t, window)
        if b <= 0:
            raise InputError(f"The keyframe at {t:g} s lands on the video's start, where the start photo is; "
                             f"move it to {step:.1f} s or later.")
        if b >= sections:
            raise InputError(f"The keyframe at {t:g} s lands on the video's end; use it as the end frame, "
                             f"or move it to {(sections - 1) * step:.1f} s or earlier.")
        if b in seen:
            raise InputError(f"The keyframes at {seen[b]:g} s and {t:g} s land on the same section boundary "
                             f"({b * step:.1f} s); keep them at least {step:.1f} s apart.")
        seen[b] = t
        out.append(b)
    return out


def prompt_indices(prompt_times, sections: int, window: int) -> list[int]:
    """Per section in video order: the index of the prompt in force (0 = the base prompt)."""
    _check_times("prompt", prompt_times, sections, window)
    step = section_seconds(window)
    for t in prompt_times:
        if boundary_of(t, window) == 0:
            raise InputError(f"The prompt at {t:g} s lands on the video's start, where the main prompt applies; "
                             f"give it {step / 2:.2f} s or later, or put its text in the main prompt.")
    starts = [(0, 0)] + sorted(((min(boundary_of(t, window), sections - 1), i + 1) for i, t in enumerate(prompt_times)))
    out = []
    for v in range(sections):
        current = 0
        for b, index in starts:  # the last one that began at or before this section wins
            if b <= v:
                current = index
        out.append(current)
    return out


def plan_sections(sections: int, window: int, mode: str, has_end_image: bool = False, prompt_times=(),
                  keyframe_times=(), blend_sections: int = 0) -> list[SectionPlan]:
    """Pure: every section's layout, stretch, anchor, endpoint, prompt and image keyframes, in sampling order.

    ``prompt_times``: start times of the timed prompts (prompt i+1; prompt 0, the base prompt, starts at 0).
    ``keyframe_times``: sorted times of the user's keyframes (keyframes 1..m).
    """
    if keyframe_times and mode != "inverted":
        raise InputError("Keyframes need the inverted anti-drift mode (forward F1 mode has no slot for a "
                         "later frame); switch the mode or remove the keyframes.")
    if list(keyframe_times) != sorted(keyframe_times):
        raise ValueError("keyframe_times must be sorted")
    prompts = prompt_indices(prompt_times, sections, window)
    blends = _blends(prompts, blend_sections)
    step = section_seconds(window)
    if mode != "inverted":
        return [SectionPlan(layout.number, layout.number, layout.number * step, (layout.number + 1) * step, layout,
                            0, 0, None, (0,), prompts[layout.number], *blends[layout.number])
                for layout in schedule.section_layouts(sections, window, mode)]

    cuts = [0] + keyframe_boundaries(keyframe_times, sections, window) + [sections]
    end_keyframe = len(keyframe_times) + 1 if has_end_image else None
    plans: list[SectionPlan] = []
    for stretch in reversed(range(len(cuts) - 1)):  # the last stretch is sampled first
        first, stop = cuts[stretch], cuts[stretch + 1]
        endpoint = stretch + 1 if stretch + 1 < len(cuts) - 1 else end_keyframe
        keyframes = (stretch,) if endpoint is None else (stretch, endpoint)
        for local in schedule.section_layouts(stop - first, window, "inverted", endpoint is not None):
            number = len(plans)
            video = sections - 1 - number
            layout = dataclasses.replace(local, number=number, is_first=number == 0, is_last=number == sections - 1)
            plans.append(SectionPlan(number, video, video * step, (video + 1) * step, layout, stretch, stretch,
                                     endpoint if local.use_end_image else None, keyframes, prompts[video],
                                     *blends[video]))
    return plans


def plan_for(params, has_end_image: bool) -> list[SectionPlan]:
    """A job's section plan from its JobParams (InputError, one sentence, for a storyboard that cannot work)."""
    return plan_sections(schedule.section_count(params.seconds, params.window), params.window, params.mode,
                         has_end_image, [t for t, _ in params.timed_prompts], [t for t, _ in params.sorted_keyframes],
                         params.prompt_blend)


def _blends(prompts: list[int], blend_sections: int) -> list[tuple[int | None, float]]:
    """(previous prompt, weight of the current one) per section in video order."""
    out: list[tuple[int | None, float]] = []
    since, previous = 0, None
    for v, index in enumerate(prompts):
        if v > 0 and index != prompts[v - 1]:
            since, previous = 0, prompts[v - 1]
        if previous is not None and since < blend_sections:
            out.append((previous, (since + 1) / (blend_sections + 1)))
        else:
            out.append((None, 1.0))
        since += 1
    return out


STORYBOARD_KEYS = {"prompts": {"at", "prompt"}, "keyframes": {"at", "image"}, "blend_sections": None}


def load_file(path) -> dict:
    """A storyboard JSON file -> JobParams fields (prompt, timed_prompts, keyframes, prompt_blend).

    {"prompts": [{"at": 0, "prompt": "..."}, ...], "keyframes": [{"at": 2.4, "image": "key.png"}, ...],
    "blend_sections": 1}; image paths are relative to the file. A prompt at 0 s is the base prompt.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"The storyboard file {path} cannot be read ({exc.strerror or exc}).") from exc
    except ValueError as exc:
        raise InputError(f"The storyboard file {path} is not valid JSON ({exc}); fix it or leave it out.") from exc
    if not isinstance(data, dict):
        raise InputError(f"The storyboard file {path} must hold one JSON object with prompts and keyframes.")
    unknown = set(data) - set(STORYBOARD_KEYS)
    if unknown:
        raise InputError(f"The storyboard file {path} has unknown keys {sorted(unknown)}; "
                         f"use {', '.join(STORYBOARD_KEYS)}.")
    out: dict = {"timed_prompts": [], "keyframes": []}
    for key, fields in (("prompts", STORYBOARD_KEYS["prompts"]), ("keyframes", STORYBOARD_KEYS["keyframes"])):
        entries = data.get(key, [])
        if not isinstance(entries, list):
            raise InputError(f"\"{key}\" in {path} must be a list of objects with {sorted(fields)}.")
        for entry in entries:
            # job.json's storyboard adds "file" (the saved crop): such a record can be fed back as is.
            extra = {"file"} if key == "keyframes" else set()
            if not isinstance(entry, dict) or not fields <= set(entry) <= fields | extra:
                raise InputError(f"Each entry of \"{key}\" in {path} needs exactly {sorted(fields)}, not {entry!r}.")
            at = entry["at"]
            if isinstance(at, bool) or not isinstance(at, (int, float)):
                raise InputError(f"\"at\" in {path} must be a time in seconds, not {at!r}.")
            if key == "prompts":
                if at == 0:
                    out["prompt"] = str(entry["prompt"])
                else:
                    out["timed_prompts"].append((float(at), str(entry["prompt"])))
            else:
                out["keyframes"].append((float(at), str(path.parent / str(entry["image"]))))
    if "blend_sections" in data:
        out["prompt_blend"] = data["blend_sections"]
    return out


def record(params) -> dict:
    """The whole storyboard as job.json keeps it (times as given; keyframes in time order)."""
    return {"prompts": [{"at": 0.0, "prompt": params.prompt}]
            + [{"at": float(t), "prompt": text} for t, text in params.timed_prompts],
            "keyframes": [{"at": float(t), "image": path, "file": KEYFRAME_FILE.format(i)}
                          for i, (t, path) in enumerate(params.sorted_keyframes, 1)],
            "blend_sections": params.prompt_blend}


def plan_table(plans: list[SectionPlan], prompts: list[str], keyframe_names: list[str],
               collapse_over: int | None = None) -> str:
    """The plan as text, in video order (what --plan-only prints and the page shows).

    With more than `collapse_over` sections, neighbours that differ only in their numbers share one row
    ("12-1795"), so a thousand-section plan stays a readable handful of rows for the page.
    """
    def short(text: str) -> str:
        text = " ".join(text.split()) or "(no prompt)"
        return text if len(text) <= 48 else text[:47] + "…"

    def body(p: SectionPlan) -> tuple:
        endpoint = keyframe_names[p.endpoint] if p.endpoint is not None else "-"
        prompt = short(prompts[p.prompt])
        if p.prompt_from is not None:
            prompt = f"{p.blend:.0%} {prompt} / {short(prompts[p.prompt_from])}"
        return keyframe_names[p.anchor], endpoint, prompt, p.layout.padding

    ordered = sorted(plans, key=lambda p: p.video_index)
    runs: list[list[SectionPlan]] = []
    for p in ordered:
        if collapse_over is not None and len(ordered) > collapse_over and runs and body(runs[-1][-1]) == body(p):
            runs[-1].append(p)
        else:
            runs.append([p])
    wide = 11 if len(runs) == len(ordered) else 13
    rows = [f"{'#':>{wide - 8}}  {'time (s)':<{wide}}  {'anchor':>8} -> {'endpoint':<10}  {'prompt':<48}  "
            f"{'sampled':>7}  {'pad':>3}"]
    for run in runs:
        first, last = run[0], run[-1]
        anchor, endpoint, prompt, padding = body(first)
        number = f"{first.video_index + 1}" if len(run) == 1 else f"{first.video_index + 1}-{last.video_index + 1}"
        sampled = sorted((first.number + 1, last.number + 1))
        sampled_text = f"{sampled[0]}" if len(run) == 1 else f"{sampled[0]}-{sampled[1]}"
        span = f"{first.start_s:5.1f}-{last.end_s:5.1f}"
        rows.append(f"{number:>{wide - 8}}  {span:<{wide}}  {anchor:>8} -> {endpoint:<10}  {prompt:<48}  "
                    f"{sampled_text:>7}  {padding:>3}")
    return "\n".join(rows)
