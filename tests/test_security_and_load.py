"""The running server: bound to 127.0.0.1, serves only its own outputs, and takes a twenty-job burst."""

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from appserver import module_turn  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(app_server, request):
    base, outputs = app_server.base, app_server.outputs  # the server's outputs folder and its parent
    job = outputs / "20260101-000000-abcdef"  # a finished job the page may serve
    job.mkdir(parents=True)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(job / "input.png")
    (job / "job.json").write_text(json.dumps({"job_id": job.name, "status": "done", "params": {}}))
    (base / "secret.txt").write_text("not for the browser")
    with module_turn(app_server, request.session, healthy=False) as srv:
        srv.job = job
        yield srv


def get(server, path: str) -> int:
    try:
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def file_url(path: str, quote: bool = False) -> str:
    return "/gradio_api/file=" + (urllib.parse.quote(path, safe="") if quote else path)


def test_listens_on_loopback_only(server):
    bound = {c.laddr.ip for c in psutil.Process(server.process.pid).net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port}
    assert bound == {"127.0.0.1"}


def test_serves_its_own_output_files(server):
    assert get(server, file_url(str(server.job / "input.png"))) == 200


@pytest.mark.parametrize("make_path", [
    lambda s: "/etc/passwd",
    lambda s: str(s.base / "secret.txt"),
    lambda s: str(s.job / ".." / ".." / "secret.txt"),
    lambda s: str(s.job) + "/../../secret.txt",
    lambda s: str(s.outputs) + "/../../../../../../etc/passwd",
    lambda s: str(REPO / "app.py"),
    lambda s: str(REPO / "framepack_local" / "params.py"),
])
@pytest.mark.parametrize("quote", [False, True])
def test_refuses_every_other_path(server, make_path, quote):
    status = get(server, file_url(make_path(server), quote=quote))
    assert status in (403, 404), status


def test_refuses_model_weights_and_relative_tricks(server, tiny_model_dir):
    weights = next(Path(tiny_model_dir, "vae").glob("*.safetensors"))
    assert get(server, file_url(str(weights))) in (403, 404)
    for path in ("../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/etc/passwd",
                 "/file=../../etc/passwd", "/gradio_api/file=~/.bashrc"):
        url = path if path.startswith("/") else file_url(path)
        assert get(server, url) in (400, 403, 404), path


def test_job_ids_in_requests_are_validated(server):
    client = gradio_client.Client(server.url, verbose=False)
    for bad in ("../secret.txt", "..", "/etc", str(server.base)):
        message = client.predict(bad, api_name="/resume")
        assert "There is no job" in message or "Choose" in message, message


def test_twenty_jobs_while_one_runs(server, photo):
    client = gradio_client.Client(server.url, verbose=False)
    upload = gradio_client.handle_file(str(photo))

    def start(seconds, steps, window):
        return client.predict(upload, None, "burst", seconds, 1, steps, 10.0, "inverted", window, 1.0, "", 0.0,
                              64, 16, "auto", 0, api_name="/start")[1]

    long_key = start(20, 2, 1)  # 150 sections: still running while the burst arrives and is thinned out
    keys = [start(1, 1, 9) for _ in range(20)]  # one section each
    status = client.predict(api_name="/status")
    assert status["status"] == "running" and status["key"] == long_key
    queued = [q["key"] for q in status["queue"]]
    assert queued == keys  # all twenty queued, in order

    removed = keys[::2]  # cancel half of them while they wait
    for key in removed:
        client.predict(key, api_name="/remove_queued")
    client.predict(api_name="/stop")  # and stop the long one

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = client.predict(api_name="/status")
        if status["status"] != "running" and not status["queue"]:
            break
        time.sleep(0.3)
    assert not status["queue"] and status["status"] != "running", status
    assert server.alive()
    records = [json.loads(p.read_text()) for p in server.outputs.glob("*/job.json")]
    statuses = sorted(r["status"] for r in records if r.get("params", {}).get("prompt") == "burst")
    assert statuses.count("done") == 10 and statuses.count("stopped") == 1 and len(statuses) == 11
