"""Command line: generate, resume, report, calibrate-cache, doctor, make-tiny-model, download.

Exit codes: 0 done, 1 stopped by the user, 2 bad input or a failure explained in one sentence.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from pathlib import Path

from .errors import FramePackError, InputError
from .params import ATTENTION_BACKENDS, CACHE_MODES, COLOR_CORRECTIONS, DEFAULT_MODELS, DEFAULT_OUTPUTS, MAX_SECONDS, JobParams

logger = logging.getLogger("framepack_local")
CALIBRATION_PROMPT = "The person moves naturally, with clear movements, the camera stays still."


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one sentence and exit code 2, like every other bad input."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"Error: {message[0].upper() + message[1:]}; see --help.\n")
        sys.exit(2)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m framepack_local", description="FramePack Local: one photo -> a long video.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = JobParams(image="x")
    gen = sub.add_parser("generate", help="make a video from a photo")
    gen.add_argument("--image", required=True, help="start photo")
    gen.add_argument("--prompt", default="", help="what should happen")
    gen.add_argument("--end-image", default=None, help="optional end frame (inverted mode)")
    gen.add_argument("--prompt-at", nargs=2, action="append", default=[], metavar=("SECONDS", "TEXT"),
                     help="a prompt that takes over at that time (repeatable; --prompt is the one at 0 s)")
    gen.add_argument("--keyframe", nargs=2, action="append", default=[], metavar=("SECONDS", "IMAGE"),
                     help="an image the video passes through at that time (inverted mode; repeatable)")
    gen.add_argument("--prompt-blend", type=_whole, default=None,
                     help="sections over which a prompt change blends in (default 0: at once)")
    gen.add_argument("--storyboard", default=None, help="a JSON file with prompts, keyframes and blend_sections")
    gen.add_argument("--plan-only", action="store_true", help="print the section plan and exit; writes nothing")
    gen.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                     help="a LoRA .safetensors file (a path, or a name in <models>/loras/) and its weight, -2 to 2 "
                          "(default 1); repeatable")
    gen.add_argument("--seconds", type=_number, default=d.seconds, help=f"length, 0.1-{MAX_SECONDS:g} (default %(default)s)")
    gen.add_argument("--seed", type=_whole, default=d.seed)
    gen.add_argument("--steps", type=_whole, default=d.steps)
    gen.add_argument("--window", type=_whole, default=d.window, help="latent window size (default 9)")
    gen.add_argument("--mode", choices=["inverted", "forward"], default=d.mode)
    gen.add_argument("--sampler", choices=["unipc", "euler"], default=d.sampler)
    gen.add_argument("--distilled-cfg", type=_number, default=d.distilled_cfg)
    gen.add_argument("--cfg", type=_number, default=d.cfg, help="real CFG; 1 turns the negative pass off")
    gen.add_argument("--negative-prompt", default=d.negative_prompt)
    gen.add_argument("--cfg-rescale", type=_number, default=d.cfg_rescale)
    gen.add_argument("--resolution", type=_whole, default=d.resolution, help="bucket base in px (default 640)")
    gen.add_argument("--crf", type=_whole, default=d.crf, help="mp4 quality, 0 best - 51 worst")
    gen.add_argument("--cache", choices=CACHE_MODES, default=d.cache,
                     help="step cache: skip steps whose output barely changes (default %(default)s)")
    gen.add_argument("--cache-threshold", type=_number, default=None,
                     help="cache strength: higher skips more (default: mag 0.1, first-block 0.05)")
    gen.add_argument("--cache-max-skip", type=_whole, default=d.cache_max_skip,
                     help="MagCache: most steps skipped in a row (default %(default)s)")
    gen.add_argument("--cache-retention", type=_number, default=d.cache_retention,
                     help="MagCache: share of the first steps that always run (default %(default)s)")
    gen.add_argument("--attention", choices=ATTENTION_BACKENDS, default=d.attention,
                     help="attention kernel: auto = SageAttention or FlashAttention when installed and the GPU "
                          "runs them, else PyTorch SDPA (default %(default)s)")
    gen.add_argument("--color-correction", choices=COLOR_CORRECTIONS, default=d.color_correction,
                     help="match each section's colours to the start photo or to the neighbouring section "
                          "(against F1 colour drift; default %(default)s)")
    gen.add_argument("--color-strength", type=_number, default=d.color_strength,
                     help="colour correction strength, 0-1 (default %(default)s)")
    gen.add_argument("--auto-retry", type=_whole, default=d.auto_retry,
                     help="re-sample a section that drifted, at most N times (default 0: off)")
    gen.add_argument("--retry-threshold", type=_number, default=d.retry_threshold,
                     help="retry when the SigLIP similarity to the start drops by more than this below the "
                          "sections before (provisional default %(default)s)")
    gen.add_argument("--retry-sharpness-drop", type=_number, default=d.retry_sharpness_drop,
                     help="... or the sharpness falls by more than this share (provisional default %(default)s)")
    gen.add_argument("--retry-seam-jump", type=_number, default=d.retry_seam_jump,
                     help="... or the seam jump rises by more than this, in 0-255 levels (provisional default "
                          "%(default)s)")
    gen.add_argument("--no-drift-report", action="store_true",
                     help="skip the drift report (drift.json, drift.png) after the final video")
    gen.add_argument("--memory-profile", choices=["auto", "bf16", "fp8", "disk"], default=d.memory_profile,
                     help="transformer weight storage; auto picks the most exact one that fits")
    gen.add_argument("--keep-free-gb", type=_number, default=d.keep_free_gb,
                     help="GPU memory to leave unused, in GB (raise it after an out-of-memory error)")
    gen.add_argument("--models", default=str(DEFAULT_MODELS))
    gen.add_argument("--outputs", default=str(DEFAULT_OUTPUTS))
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")

    res = sub.add_parser("resume", help="continue a stopped, failed or interrupted job from its last section")
    res.add_argument("job_dir")
    res.add_argument("--device", default=None)
    # Where things live may change on resume (e.g. after an out-of-memory error); what is computed may not.
    res.add_argument("--memory-profile", choices=["auto", "bf16", "fp8", "disk"], default=None)
    res.add_argument("--keep-free-gb", type=_number, default=None)
    res.add_argument("--models", default=None, help="the model folder, if it moved since the job started")

    rep = sub.add_parser("report", help="drift report of a video or a job folder: table, drift.json, drift.png")
    rep.add_argument("target", metavar="VIDEO_OR_JOB_DIR")
    rep.add_argument("--out", default=None, help="folder for drift.json and drift.png (default: beside the video)")
    rep.add_argument("--models", default=None, help="model folder for the SigLIP similarity (default: the job's, "
                                                    "or models/ when present)")
    rep.add_argument("--section-frames", type=_whole, default=None,
                     help="frames per section, for the seams (default: from the job or the file, else 36)")
    rep.add_argument("--device", default=None)

    cal = sub.add_parser("calibrate-cache", help="measure MagCache ratios for this model folder (one uncached section)")
    cal.add_argument("--mode", choices=["inverted", "forward"], default=d.mode, help="which transformer to measure")
    cal.add_argument("--steps", type=_whole, default=d.steps, help="step count to calibrate (default %(default)s)")
    cal.add_argument("--image", default=None, help="photo to sample (default: a built-in test picture)")
    cal.add_argument("--prompt", default=CALIBRATION_PROMPT)
    cal.add_argument("--resolution", type=_whole, default=d.resolution, help="bucket base in px (default 640)")
    cal.add_argument("--seed", type=_whole, default=d.seed)
    cal.add_argument("--memory-profile", choices=["auto", "bf16", "fp8", "disk"], default=d.memory_profile)
    cal.add_argument("--models", default=str(DEFAULT_MODELS))
    cal.add_argument("--outputs", default=str(DEFAULT_OUTPUTS))
    cal.add_argument("--device", default=None)

    doc = sub.add_parser("doctor", help="check this computer: GPU, driver, memory, disk, what jobs can use")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.add_argument("--quick", action="store_true", help="skip the measurements")
    doc.add_argument("--models", default=str(DEFAULT_MODELS))
    doc.add_argument("--outputs", default=str(DEFAULT_OUTPUTS))

    tiny = sub.add_parser("make-tiny-model", help="build a tiny random-weight model folder (offline, for tests)")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=_whole, default=0)

    down = sub.add_parser("download", help="download the real weights (about 42 GB)")
    down.add_argument("--variant", choices=["inverted", "forward", "both"], default="inverted")
    down.add_argument("--models", default=str(DEFAULT_MODELS))
    return parser


def _storyboard(args) -> dict:
    """--storyboard, then --prompt-at / --keyframe on top (a prompt at 0 s is the base prompt)."""
    from .engine import storyboard

    story = storyboard.load_file(args.storyboard) if args.storyboard else {"timed_prompts": [], "keyframes": []}
    # Flags given on the command line win over the file.
    if args.prompt or "prompt" not in story:
        story["prompt"] = args.prompt
    if args.prompt_blend is not None or "prompt_blend" not in story:
        story["prompt_blend"] = args.prompt_blend if args.prompt_blend is not None else JobParams.prompt_blend
    for flag, pairs, key in (("--prompt-at", args.prompt_at, "timed_prompts"), ("--keyframe", args.keyframe, "keyframes")):
        for seconds, value in pairs:
            try:
                at = _number(seconds)
            except argparse.ArgumentTypeError as exc:
                raise InputError(f"{flag} needs a time in seconds first, not {seconds!r} ({exc}).") from None
            if key == "timed_prompts" and at == 0:
                story["prompt"] = value
            else:
                story[key].append((at, value))
    return story


def _params(args) -> JobParams:
    from .weights.lora import parse_lora_arg

    story = _storyboard(args)
    return JobParams(
        image=args.image, prompt=story["prompt"], end_image=args.end_image, seconds=args.seconds, seed=args.seed,
        timed_prompts=tuple(story["timed_prompts"]), keyframes=tuple(story["keyframes"]),
        prompt_blend=story["prompt_blend"], loras=tuple(parse_lora_arg(spec) for spec in args.lora),
        steps=args.steps, window=args.window, mode=args.mode, sampler=args.sampler,
        distilled_cfg=args.distilled_cfg, cfg=args.cfg, negative_prompt=args.negative_prompt,
        cfg_rescale=args.cfg_rescale, resolution=args.resolution, crf=args.crf,
        cache=args.cache, cache_threshold=args.cache_threshold, cache_max_skip=args.cache_max_skip,
        cache_retention=args.cache_retention, attention=args.attention, drift_report=not args.no_drift_report,
        color_correction=args.color_correction, color_strength=args.color_strength, auto_retry=args.auto_retry,
        retry_threshold=args.retry_threshold, retry_sharpness_drop=args.retry_sharpness_drop,
        retry_seam_jump=args.retry_seam_jump,
        memory_profile=args.memory_profile, keep_free_gb=args.keep_free_gb,
        models=args.models, outputs=args.outputs,
    ).validate()


def _generate(args) -> int:
    params = _params(args)
    if args.plan_only:
        return _print_plan(params)
    return _run_job(args, params, None)


def _print_plan(params: JobParams) -> int:
    from .engine import storyboard

    plans = storyboard.plan_for(params, bool(params.end_image))
    names = ["photo"] + [f"key@{t:g}s" for t, _ in params.sorted_keyframes] + (["end frame"] if params.end_image else [])
    print(storyboard.plan_table(plans, params.prompts, names))
    return 0


def _resume(args) -> int:
    return _run_job(args, None, Path(args.job_dir))


def _run_job(args, params: JobParams | None, job_dir: Path | None) -> int:
    from .events import CancelToken, JobStarted, Notice, SectionFinished, StageChanged, StepProgress
    from .engine.generate import Engine
    from .memory.measure import peak_rss, rss_bytes

    cancel = CancelToken()
    # First Ctrl+C stops after the current step and keeps the video so far; a second one kills.
    signal.signal(signal.SIGINT, lambda *_: (cancel.cancel(), signal.signal(signal.SIGINT, signal.SIG_DFL)))

    last = [time.perf_counter()]

    def show(event) -> None:
        if isinstance(event, JobStarted):
            last[0] = time.perf_counter()
            logger.info("job %s: %d sections, %d frames at %dx%d -> %s", event.job_id, event.sections,
                        event.frames, event.width, event.height, event.job_dir)
        elif isinstance(event, StepProgress):
            logger.info("section %d/%d step %d/%d", event.section, event.sections, event.step, event.steps)
        elif isinstance(event, SectionFinished):
            # Time and RAM per section: a long job's flat line is visible in the log (benchmarks/bench_long.py).
            now = time.perf_counter()
            logger.info("section %d/%d done: %s (%d frames) in %.3f s (%.0f s elapsed, RAM %.0f MB, peak %.0f MB)",
                        event.section, event.sections, event.video_path, event.frames, now - last[0],
                        event.elapsed_s, rss_bytes() / 2**20, peak_rss() / 2**20)
            last[0] = now
        elif isinstance(event, (StageChanged, Notice)):
            logger.info("%s", event.message)

    engine = Engine(device=args.device)
    if job_dir is not None:
        overrides = {k: v for k, v in (("memory_profile", args.memory_profile), ("keep_free_gb", args.keep_free_gb),
                                       ("models", args.models)) if v is not None}
        result = engine.resume(job_dir, on_event=show, cancel=cancel, overrides=overrides)
    else:
        result = engine.generate(params, on_event=show, cancel=cancel)
    if result.status == "stopped":
        print("Stopped; the video so far is kept." if result.video_path else "Stopped before any section was done.",
              file=sys.stderr)
        if result.video_path:
            print(result.video_path)
        return 1
    print(result.video_path)
    return 0


def _report(args) -> int:
    from .engine import drift as drift_report
    from .jobs import drift

    result, json_path, chart = drift_report.report(
        Path(args.target), Path(args.out) if args.out else None, Path(args.models) if args.models else None,
        args.device, args.section_frames)
    print(drift.table(result))
    print(json_path)
    print(chart)
    return 0


def _calibrate(args) -> int:
    import tempfile

    from .engine import step_cache
    from .engine.generate import Engine
    from .images import calibration_picture

    with tempfile.TemporaryDirectory() as scratch:
        image = args.image
        if image is None:
            image = str(Path(scratch) / "calibration.png")
            calibration_picture().save(image)
        params = JobParams(image=image, prompt=args.prompt, steps=args.steps, mode=args.mode, seed=args.seed,
                           resolution=args.resolution, memory_profile=args.memory_profile,
                           models=args.models, outputs=args.outputs).validate()
        result = Engine(device=args.device).calibrate_cache(params)
    plan = step_cache.plan_step_cache("mag", args.mode, args.steps, calibrated={args.steps: result.ratios})
    computed = sum(step_cache.planned_computed_steps(plan, args.steps))
    print(f"MagCache ratios of the {args.mode} transformer at {args.steps} steps:", file=sys.stderr)
    print(", ".join(f"{r:.5f}" for r in result.ratios), file=sys.stderr)
    print(f"With them MagCache (default strength) computes {computed} of {args.steps} steps per section; "
          f"every later MagCache job with this model folder uses them.", file=sys.stderr)
    print(result.stored)
    return 0


def _doctor(args) -> int:
    import json

    from .doctor import diagnose

    report = diagnose(Path(args.models), Path(args.outputs), measure=not args.quick)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.ok else 1


def _make_tiny(args) -> int:
    from .weights.tiny import make_tiny_model

    path = make_tiny_model(Path(args.dir), seed=args.seed)
    print(path)
    return 0


def _download(args) -> int:
    from .weights.download import download_models

    last = [0.0]

    def show(p) -> None:
        import time

        now = time.monotonic()
        if now - last[0] < 1.0 and not p.finished:  # one line a second is plenty
            return
        last[0] = now
        eta = "?" if p.eta_seconds is None else f"{p.eta_seconds / 60:.0f} min"
        sys.stderr.write(f"{p.fraction:6.1%}  {p.bytes_done / 1e9:.2f}/{p.bytes_total / 1e9:.2f} GB  "
                         f"{p.bytes_per_second / 1e6:.1f} MB/s  left {eta}  {p.current_file or ''}\n")

    download_models(Path(args.models), args.variant, on_progress=show)
    print(args.models)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (already explained in one sentence) and --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore", "urllib3", "diffusers", "transformers", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handlers = {"generate": _generate, "resume": _resume, "report": _report, "calibrate-cache": _calibrate, "doctor": _doctor,
                "make-tiny-model": _make_tiny, "download": _download}
    try:
        return handlers[args.command](args)
    except FramePackError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 2
    except Exception as exc:  # a bug, not bad input: say so in one line, details only with -v
        logger.debug("unexpected failure", exc_info=True)
        sys.stderr.write(f"Error: unexpected failure ({type(exc).__name__}: {exc}); run again with -v for details.\n")
        return 3


if __name__ == "__main__":
    sys.exit(main())
