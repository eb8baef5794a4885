"""Starting the page: command-line options, the demo model, launch settings, the worker's lifetime.

    python app.py [--port 7860] [--models DIR] [--outputs DIR] [--listen] [--demo] [--no-browser]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..params import APP_ROOT, DEFAULT_MODELS, DEFAULT_OUTPUTS
from ..weights.model_folder import missing_parts
from ..worker import Worker
from .layout import CSS, build_app, make_theme

logger = logging.getLogger("framepack_local.app")

DEMO_MODELS = APP_ROOT / "models-demo"
MAX_UPLOAD = "50mb"  # photos are far smaller; bigger uploads are refused by the page with a sentence
MAX_UPLOAD_TEXT = "50 MB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="FramePack Local: the page in your browser.")
    parser.add_argument("--port", type=int, default=7860, help="port on this computer (default %(default)s)")
    parser.add_argument("--models", default=None, help=f"model folder (default {DEFAULT_MODELS})")
    parser.add_argument("--outputs", default=str(DEFAULT_OUTPUTS), help="where job folders go (default %(default)s)")
    parser.add_argument("--listen", action="store_true",
                        help="also accept connections from other computers (binds 0.0.0.0); off by default")
    parser.add_argument("--demo", action="store_true",
                        help=f"use a tiny random model (built in {DEMO_MODELS.name}/ when absent); videos are noise")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def resolve_models(args: argparse.Namespace) -> Path:
    """The model folder to use; with --demo, a tiny random one (built on first use)."""
    if not args.demo:
        return Path(args.models).expanduser().resolve() if args.models else DEFAULT_MODELS
    models_dir = Path(args.models).expanduser().resolve() if args.models else DEMO_MODELS
    if missing_parts(models_dir, "inverted") or missing_parts(models_dir, "forward"):
        from ..weights.tiny import make_tiny_model

        logger.info("Building the tiny demo model in %s ...", models_dir)
        make_tiny_model(models_dir)
    return models_dir


def launch_kwargs(args: argparse.Namespace, models_dir: Path, outputs_dir: Path) -> dict:
    return dict(
        server_name="0.0.0.0" if args.listen else "127.0.0.1",
        server_port=args.port,
        inbrowser=not args.no_browser,
        # Serve the job folders and Gradio's own cache, nothing else (never the models or the source).
        allowed_paths=[str(outputs_dir)],
        blocked_paths=[str(models_dir)],
        max_file_size=MAX_UPLOAD,
        # Handlers answer with our own sentences; what Gradio refuses before a handler runs (a file that
        # was never uploaded) reaches the caller with Gradio's sentence instead of an empty error.
        # Never a traceback either way.
        show_error=True,
        theme=make_theme(),
        css=CSS,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    outputs_dir = Path(args.outputs).expanduser().resolve()
    try:
        outputs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        sys.stderr.write(f"The outputs folder {outputs_dir} cannot be created ({exc.strerror}); "
                         "choose another one with --outputs.\n")
        return 2
    models_dir = resolve_models(args)
    if args.listen:
        logger.warning("--listen: the page is exposed on your network at port %d; anyone who can reach this "
                       "computer can run jobs and see your videos.", args.port)

    try:
        from ..jobs import store

        for job_dir in store.recover_interrupted(outputs_dir):
            logger.info("Job %s was interrupted when the app last stopped; it can be resumed from the history.",
                        job_dir.name)
    except Exception:  # noqa: BLE001 - the history shows such jobs as interrupted anyway
        logger.debug("could not check for interrupted jobs", exc_info=True)

    # torch and diffusers are imported here, once, before any server or worker thread exists: their
    # first import is not safe to run in two threads at once (the page's system panel and the first
    # job would otherwise race, and diffusers' lazy modules then fail with an ImportError).
    from ..engine.generate import Engine

    worker = Worker(Engine())
    app = build_app(worker, models_dir, outputs_dir, demo=args.demo, listen=args.listen)
    app.queue(default_concurrency_limit=4)
    try:
        app.launch(**launch_kwargs(args, models_dir, outputs_dir))
    except OSError as exc:
        sys.stderr.write(f"The page could not start on port {args.port} ({exc}); "
                         "close the program using it or choose another port with --port.\n")
        return 2
    finally:
        worker.shutdown(timeout=15)
    return 0
