"""FramePack Local: start the page in your browser (Gradio 6, on 127.0.0.1).

    python app.py [--port 7860] [--models DIR] [--outputs DIR] [--listen] [--demo] [--no-browser]

The page itself lives in framepack_local/ui/ (layout, handlers, HTML, downloads); this file only
starts it, so `./run.sh` and `python app.py` keep working wherever the code moves.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from framepack_local.ui.launch import launch_kwargs, main, parse_args, resolve_models  # noqa: E402
from framepack_local.ui.layout import build_app  # noqa: E402

__all__ = ["build_app", "launch_kwargs", "main", "parse_args", "resolve_models"]

if __name__ == "__main__":
    sys.exit(main())
