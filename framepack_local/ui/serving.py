"""Videos go to the browser straight from the job folder: no per-section copy in Gradio's temp folder.

The outputs folder is a Gradio static path (``gr.set_static_paths``), so a video under it is served
from where it is. The video so far keeps one name (``partial.mp4``) and changes after every section;
a browser keeps showing a file whose URL did not change, so each section's video is offered under a
new name in ``<job>/.preview/``: a hard link (no extra bytes), or a copy where the file system has no
hard links (and on Windows, where a served file cannot be replaced). Only the newest two are kept (a
browser may still be fetching the previous one); the folder goes when the job has ended and a page
shows it, and at the next start for jobs that ended while no page was open.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

PREVIEW_DIR = ".preview"


def serve_static(outputs_dir: Path) -> None:
    """Serve files under the outputs folder in place (call before the page is built)."""
    import gradio as gr

    gr.set_static_paths([str(Path(outputs_dir).resolve())])


def section_video(partial: Path, sections_done: int) -> Path:
    """A per-section name for the video so far, holding the same bytes; older names are removed."""
    folder = partial.parent / PREVIEW_DIR
    target = folder / f"{sections_done:05d}-{partial.name}"  # still ends in partial.mp4
    if target.is_file():
        return target
    try:
        folder.mkdir(exist_ok=True)
        if os.name == "nt":
            # Windows cannot replace partial.mp4 while a browser streams a link to the same file.
            shutil.copyfile(partial, target)
        else:
            try:
                os.link(partial, target)
            except OSError:  # no hard links here (FAT, some network drives): a copy
                shutil.copyfile(partial, target)
    except OSError as exc:
        logger.warning("could not offer %s under a new name (%s); serving it as it is", partial, exc)
        return partial
    # Keep the previous one too: a browser may still be fetching it while the next poll arrives.
    for old in sorted(folder.iterdir())[:-2]:
        try:
            old.unlink(missing_ok=True)
        except OSError:  # still open somewhere (Windows): it goes with the folder later
            pass
    return target


def drop_previews(job_dir: Path) -> None:
    """The job has ended: its per-section names are not needed any more."""
    shutil.rmtree(Path(job_dir) / PREVIEW_DIR, ignore_errors=True)


def drop_all_previews(outputs_dir: Path) -> None:
    """At start: names left by jobs that ended while no page was open (or by a crash)."""
    for folder in Path(outputs_dir).glob(f"*/{PREVIEW_DIR}"):
        shutil.rmtree(folder, ignore_errors=True)
