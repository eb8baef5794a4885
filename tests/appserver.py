"""Start app.py in a subprocess on a free 127.0.0.1 port for client and browser tests; always kill it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 120


@dataclass
class AppServer:
    url: str
    port: int
    outputs: Path
    log_path: Path
    process: subprocess.Popen

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)  # the app and anything it started
    except (ProcessLookupError, PermissionError, AttributeError):
        process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, AttributeError):
            process.kill()
        process.wait(10)


@contextlib.contextmanager
def running_app(models: Path, outputs: Path, log_dir: Path, *extra: str):
    port = free_port()
    log_path = log_dir / f"app-{port}.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               GRADIO_TEMP_DIR=str(log_dir / "gradio-cache"))
    cmd = [sys.executable, str(REPO / "app.py"), "--models", str(models), "--outputs", str(outputs),
           "--no-browser", "--port", str(port), *extra]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = AppServer(f"http://127.0.0.1:{port}/", port, outputs, log_path, process)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with {process.returncode}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(server.url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not answer within {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        _stop(process)


@contextlib.contextmanager
def healthy_app(models: Path, base: Path, *extra: str):
    """running_app for a module's tests, checking afterwards that it stayed up and logged no traceback."""
    with running_app(models, base / "outputs", base, *extra) as srv:
        yield srv
        assert srv.alive(), srv.log_tail()
        assert "Traceback" not in srv.log_tail(100_000), srv.log_tail()
