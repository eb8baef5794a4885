"""FramePack Local: one photo -> a long, coherent video, on a small GPU.

Layers (each folder imports only the ones listed before it, plus the shared vocabulary here):
  params, errors, events, images, files   the vocabulary every layer shares
  weights/   the model folder: spec, download, tiny model, safetensors I/O, storage, block streaming
  memory/    probe + plan (pure), residency per stage, measurement helpers
  jobs/      the job store: job folders, section files, mp4 writing, listing past jobs
  engine/    schedule and section plan (pure), sampler, stitching, encoders, the section loop
  worker.py  the background worker and queue
  ui/        the Gradio page (the only place gradio is imported)

``from framepack_local import Engine, JobParams`` works without importing torch up front: names are
resolved on first use (PEP 562), so importing the package does nothing.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "JobParams": "framepack_local.params",
    "Engine": "framepack_local.engine.generate",
    "JobResult": "framepack_local.engine.generate",
    "CancelToken": "framepack_local.events",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'framepack_local' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
