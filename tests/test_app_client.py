"""app.py as a real server (subprocess, 127.0.0.1, tiny model) driven through gradio_client."""

import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from appserver import module_turn  # noqa: E402

TIMEOUT = 180
FAST = dict(seconds=1, steps=2, window=2, resolution=64)  # 4 sections of 8 frames
SLOW = dict(seconds=20, steps=4, window=1, resolution=64)  # 150 sections: always stopped early


@pytest.fixture(scope="module")
def server(app_server, request):
    with module_turn(app_server, request.session) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return gradio_client.Client(server.url, verbose=False,
                                download_files=str(tmp_path_factory.mktemp("client-downloads")))


def start(client, photo, prompt="waves", **settings):
    s = dict(FAST, **settings)
    return client.predict(
        gradio_client.handle_file(str(photo)), None, prompt, s["seconds"], s.get("seed", 1), s["steps"], 10.0,
        "inverted", s["window"], 1.0, "", 0.0, s["resolution"], 16, "auto", 0,
        api_name="/start",
    )


def status(client):
    return client.predict(api_name="/status")


def wait_status(client, predicate, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = status(client)
        if predicate(s):
            return s
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last status {s}")


def outcome(client, key):
    for o in status(client)["recent"]:
        if o["key"] == key:
            return o
    return None


def wait_outcome(client, key, timeout=TIMEOUT):
    wait_status(client, lambda s: any(o["key"] == key for o in s["recent"]), f"{key} to end", timeout)
    return outcome(client, key)


def test_api_endpoints_have_stable_names(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/start", "/stop", "/poll", "/status", "/remove_queued", "/history", "/history_select", "/reuse",
            "/resume", "/download_models", "/set_models_folder", "/system"} <= names


def test_job_progress_and_section_video(client, photo):
    message, key = start(client, photo, prompt="progress")
    assert message == f"Started {key}.", message
    seen = set()
    deadline = time.monotonic() + TIMEOUT
    video = None
    while time.monotonic() < deadline:
        s = status(client)
        if s["key"] == key and s["step"]:
            seen.add((s["section"], s["step"]))
        if s["key"] == key and s["sections_done"] >= 1 and video is None:
            # the page's own polling endpoint hands out the video so far (downloaded by the client)
            out = client.predict(api_name="/poll")
            progress, preview, partial, final = out[:4]
            video = partial or final
            assert video and Path(video).is_file() and Path(video).stat().st_size > 0
            assert "fpl-progress" in progress
        if s["key"] == key and s["status"] != "running":
            break
        time.sleep(0.1)
    assert s["status"] == "done", s
    assert video is not None
    assert len(seen) >= 2 and s["sections"] == 4 and s["sections_done"] == 4
    assert s["final_video"].endswith("video.mp4") and Path(s["final_video"]).is_file()
    assert outcome(client, key)["status"] == "done"
    # a new session (fresh page) sees the finished job with its final video
    fresh = gradio_client.Client(client.src, verbose=False, download_files=client.download_files)
    out = fresh.predict(api_name="/poll")
    assert "Done" in out[0] and out[3] and Path(out[3]).name == "video.mp4"


def test_stop_running_job(client, photo):
    _, key = start(client, photo, prompt="to be stopped", **SLOW)
    s = wait_status(client, lambda s: s["key"] == key and s["sections_done"] >= 1, "a first section")
    assert s["status"] == "running" and s["eta_s"] is not None and s["sections"] == 150
    assert client.predict(api_name="/stop") == "Stopping after the current step; the finished sections are kept."
    o = wait_outcome(client, key, 60)
    assert o["status"] == "stopped" and o["error"] is None
    s = status(client)
    assert s["status"] == "stopped" and 1 <= s["sections_done"] < 150
    assert Path(s["partial_video"]).is_file() and s["final_video"] is None
    assert client.predict(api_name="/stop") == "Nothing is running."


def test_queue_two_jobs_both_finish(client, photo):
    m1, k1 = start(client, photo, prompt="first in line", seed=11)
    m2, k2 = start(client, photo, prompt="second in line", seed=12)
    assert k1 and k2 and k1 != k2
    assert m2.startswith(f"Queued as {k2}") or m2 == f"Started {k2}."  # started if the first was very quick
    if m2.startswith("Queued"):
        assert any(q["key"] == k2 for q in status(client)["queue"])
    o2 = wait_outcome(client, k2)
    o1 = outcome(client, k1)
    assert o1["status"] == o2["status"] == "done"
    recent = [o["key"] for o in status(client)["recent"]]
    assert recent.index(k2) < recent.index(k1)  # newest first: k1 finished before k2
    gallery, pick = client.predict(api_name="/history")
    captions = [c for c, _ in pick["choices"]] if isinstance(pick, dict) else []
    assert any("second in line" in c for c in captions) and any("first in line" in c for c in captions)


def test_remove_queued_job(client, photo):
    _, k1 = start(client, photo, prompt="long one", **SLOW)
    message, k2 = start(client, photo, prompt="never runs")
    assert message.startswith(f"Queued as {k2}")
    assert client.predict(k2, api_name="/remove_queued") == f"Removed {k2} from the queue."
    assert all(q["key"] != k2 for q in status(client)["queue"])
    wait_status(client, lambda s: s["key"] == k1 and s["step"] >= 1, "the long job to run")
    client.predict(api_name="/stop")
    assert wait_outcome(client, k1, 60)["status"] == "stopped"
    assert outcome(client, k2)["status"] == "removed"


def test_bad_input_is_one_sentence_and_server_stays_up(client, server, photo, tmp_path):
    message, key = client.predict(None, None, "x", 5, 1, 25, 10.0, "inverted", 9, 1.0, "", 0.0, 640, 16, "auto", 0,
                                  api_name="/start")
    assert key == "" and message.startswith("⚠️ Choose a start photo first")
    message, key = client.predict(
        gradio_client.handle_file(str(photo)), gradio_client.handle_file(str(photo)), "x", 1, 1, 2, 10.0, "forward",
        1, 1.0, "", 0.0, 64, 16, "auto", 0, api_name="/start")
    assert key == "" and message == ("⚠️ An end image only works in inverted anti-drift mode; switch the mode or "
                                     "drop the end image.")
    # an upload above the page's limit is refused, and the server carries on
    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.truncate(51 * 1024 * 1024)
    with pytest.raises(Exception) as info:
        start(client, big)
    assert "413" in str(info.value) or "size" in str(info.value).lower()
    assert server.alive() and status(client)["status"] in ("done", "stopped", "idle", "failed")


def test_refusals_through_the_api_carry_a_sentence(server, client, tmp_path):
    import httpx

    fake = tmp_path / "holiday.png"
    fake.write_bytes(b"this is not a picture")
    message, ticket = client.predict(gradio_client.handle_file(str(fake)), api_name="/start")
    assert ticket == "" and "is not an image this app can read" in message  # our sentence, not Gradio's
    # A path nobody uploaded: Gradio refuses it before any handler runs, and now says why.
    from framepack_local.ui.forms import FORM_FIELDS

    data = [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}] + [None] * (len(FORM_FIELDS) - 1)
    event = httpx.post(server.url + "gradio_api/call/start", json={"data": data}, timeout=30).json()["event_id"]
    reply = httpx.get(server.url + f"gradio_api/call/start/{event}", timeout=60).text
    assert "event: error" in reply and "not uploaded by a user" in reply and "Traceback" not in reply
    assert server.alive()
