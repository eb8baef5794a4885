"""Start app.py in a subprocess on a free 127.0.0.1 port for client and browser tests; always kill it.

The client, browser and security modules share one server per session (conftest.py starts it in the
background while the tests are still being collected); `module_turn` gives each module its own checks.
running_app / healthy_app start a private one, for tests that need other app options or a fresh state.
"""

from __future__ import annotations

import contextlib
import os
import re
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
    ready_at: int = 0  # length of the log when the server first answered

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def alive(self) -> bool:
        return self.process.poll() is None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
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



def start_app(models: Path, outputs: Path, log_dir: Path, *extra: str) -> AppServer:
    """Launch app.py and return at once; `wait_ready` waits until it answers."""
    port = free_port()
    log_path = log_dir / f"app-{port}.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               GRADIO_TEMP_DIR=str(log_dir / "gradio-cache"))
    cmd = [sys.executable, str(REPO / "app.py"), "--models", str(models), "--outputs", str(outputs),
           "--no-browser", "--port", str(port), *extra]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return AppServer(f"http://127.0.0.1:{port}/", port, outputs, log_path, process)


def wait_ready(server: AppServer, timeout: float = STARTUP_TIMEOUT_S) -> AppServer:
    if server.ready_at:
        return server
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"app.py exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url, timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"app.py did not answer within {timeout} s:\n{server.log_tail()}")
        time.sleep(0.2)
    server.ready_at = max(1, len(server.log_text()))
    return server


@contextlib.contextmanager
def running_app(models: Path, outputs: Path, log_dir: Path, *extra: str):
    server = start_app(models, outputs, log_dir, *extra)
    try:
        yield wait_ready(server)
    finally:
        stop(server.process)


# Gradio prints a traceback for each file path it refuses before any handler runs (it prints every
# error that is not a gr.Error); that refusal is expected in the security tests, never a crash of ours.
_GRADIO_REFUSAL = re.compile(r"Traceback \(most recent call last\):\n(?:(?:[ \t].*)?\n)*?"
                             r"gradio\.exceptions\.InvalidPathError: [^\n]*\n")


def assert_healthy(srv: AppServer, since: int = 0) -> None:
    """Still up, and no traceback in the log: neither while starting nor from offset `since` on."""
    assert srv.alive(), srv.log_tail()
    log = srv.log_text()
    assert "Traceback" not in _GRADIO_REFUSAL.sub("", log[:srv.ready_at] + log[since:]), srv.log_tail()


@contextlib.contextmanager
def healthy_app(models: Path, base: Path, *extra: str):
    """running_app for a module's tests, checking afterwards that it stayed up and logged no traceback."""
    with running_app(models, base / "outputs", base, *extra) as srv:
        yield srv
        assert_healthy(srv)


def settle(srv: AppServer, timeout: float = 120) -> None:
    """Stop whatever runs and drop whatever waits, so the next module starts on an idle server."""
    import gradio_client

    client = gradio_client.Client(srv.url, verbose=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = client.predict(api_name="/status")
        for q in s["queue"]:
            client.predict(q["key"], api_name="/remove_queued")
        if s["status"] == "running":
            client.predict(api_name="/stop")
        elif not s["queue"]:
            return
        time.sleep(0.2)


@contextlib.contextmanager
def module_turn(srv: AppServer, session, healthy: bool = True):
    """One module's use of the shared server.

    healthy: afterwards, like healthy_app, the server is still up and has logged no traceback (while
    starting, or during this module). If a test of the module failed, whatever it left running or
    queued is stopped, so one module's failure does not spill into the next.
    """
    since = len(srv.log_text())
    failed = session.testsfailed
    yield srv
    if session.testsfailed != failed and srv.alive():
        with contextlib.suppress(Exception):
            settle(srv)
    if healthy:
        assert_healthy(srv, since)
