"""Shared fixtures: one tiny random-weight model folder per test session, small photos."""

import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from framepack_local.weights.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


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
