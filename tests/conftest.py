"""Shared fixtures: one tiny random-weight model folder and one app server per test session, small photos."""

import os

import numpy as np
import pytest
from PIL import Image

import appserver

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads that wait for work sleep instead of spinning. The suite often has two busy processes
# (a CLI or app server working while the tests compute, or another job on this 2-core machine); with
# spinning threads each one's waits burn the other's cores and the tiny-model runs get many times
# slower. Waiting changes no result: the same threads split the same work. Set here, before anything
# imports torch, so this process and every process the tests start (they inherit os.environ) get it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Modules that drive app.py as a real server. They share one, started in the background as soon as
# the first of them is collected, so its start-up overlaps the rest of collection.
APP_SERVER_MODULES = ("test_app_client.py", "test_browser.py", "test_security_and_load.py")
# The browser test reads what a fresh tab shows, and a fresh tab shows the server's latest job, so it
# runs first of them, on a server that has not run a job yet.
FIRST_ON_THE_SERVER = "test_browser.py"

_session: dict = {}


def _tiny_model(config):
    if "tiny" not in _session:
        from framepack_local.weights.tiny import make_tiny_model

        # the same factory the tmp_path_factory fixture hands out
        _session["tiny"] = make_tiny_model(config._tmp_path_factory.mktemp("models") / "tiny")
    return _session["tiny"]


def _shared_app(config) -> appserver.AppServer:
    if "app" not in _session:
        base = config._tmp_path_factory.mktemp("app")
        srv = appserver.start_app(_tiny_model(config), base / "outputs", base)
        srv.base = base
        _session["app"] = srv
    return _session["app"]


def pytest_collectstart(collector):
    if isinstance(collector, pytest.Module) and collector.path.name in APP_SERVER_MODULES:
        _shared_app(collector.config)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    on_server = [item for item in items if item.path.name in APP_SERVER_MODULES]
    if not on_server or on_server[0].path.name == FIRST_ON_THE_SERVER:
        return
    first = [item for item in items if item.path.name == FIRST_ON_THE_SERVER]
    rest = [item for item in items if item.path.name != FIRST_ON_THE_SERVER]
    at = rest.index(on_server[0])
    items[:] = rest[:at] + first + rest[at:]


def pytest_collection_finish(session):
    srv = _session.get("app")
    if srv is not None and not any("app_server" in getattr(item, "fixturenames", ()) for item in session.items):
        appserver.stop(srv.process)  # nothing selected needs it (-k, --collect-only, ...)


def pytest_sessionfinish(session):
    srv = _session.pop("app", None)
    if srv is not None:
        appserver.stop(srv.process)


@pytest.fixture(scope="session")
def tiny_model_dir(pytestconfig):
    return _tiny_model(pytestconfig)


@pytest.fixture(scope="session")
def app_server(pytestconfig, tiny_model_dir):
    """app.py on 127.0.0.1 with the tiny model and an empty outputs folder (at first); use it through
    appserver.module_turn."""
    srv = appserver.wait_ready(_shared_app(pytestconfig))
    yield srv
    appserver.stop(srv.process)


def _photo(path, width, height, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(1, width - 1), yy * 255 / max(1, height - 1), np.full_like(xx, 128)], -1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path)
    return path


@pytest.fixture(scope="session")
def photo(tmp_path_factory):
    """A 4:3 landscape photo."""
    return _photo(tmp_path_factory.mktemp("img") / "photo.png", 160, 120)


@pytest.fixture(scope="session")
def end_photo(tmp_path_factory):
    return _photo(tmp_path_factory.mktemp("img") / "end.png", 160, 120, seed=1)
