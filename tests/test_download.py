"""Download planning and the download loop, offline: realistic listings and an in-memory hub."""

from __future__ import annotations

import errno
import fnmatch
import json
import re
import socket
import time
from collections import namedtuple
from pathlib import Path

import pytest

import framepack_local.weights.download as download
from framepack_local.weights.download import (
    ALLOW_PATTERNS,
    IGNORE_PATTERNS,
    DownloadItem,
    DownloadProgress,
    HuggingFaceHub,
    download_models,
    download_plan,
    plan_files,
)
from framepack_local.errors import DownloadError
from framepack_local.weights.model_folder import PARTS, missing_parts

SHARED_TARGETS = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "image_encoder", "feature_extractor"]
PICKLE_LIKE = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx")


def assert_one_sentence(message: str) -> None:
    assert "\n" not in message
    assert message.endswith("."), message
    assert re.search(r"[.!?]\s+[A-Z]", message) is None, message


def _shards(prefix: str, stem: str, count: int) -> list[str]:
    return [f"{prefix}{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


# File listings as published (plus pickle duplicates that must never be fetched).
HUNYUAN_FILES = [
    ".gitattributes",
    "README.md",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    *_shards("text_encoder/", "model", 4),
    "text_encoder/model.safetensors.index.json",
    "text_encoder/pytorch_model.bin.index.json",
    "text_encoder/pytorch_model-00001-of-00002.bin",
    "text_encoder/pytorch_model-00002-of-00002.bin",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "text_encoder_2/pytorch_model.bin",
    "text_encoder_2/flax_model.msgpack",
    "text_encoder_2/tf_model.h5",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    # HunyuanVideo's own 13B text-to-video transformer: same repo, never ours to fetch
    "transformer/config.json",
    *_shards("transformer/", "diffusion_pytorch_model", 3),
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.bin",
    "vae/model.onnx",
]
REDUX_FILES = [
    ".gitattributes",
    "LICENSE.md",
    "README.md",
    "flux1-redux-dev.safetensors",
    "model_index.json",
    "redux.png",
    "feature_extractor/preprocessor_config.json",
    "image_embedder/config.json",
    "image_embedder/diffusion_pytorch_model.safetensors",
    "image_encoder/config.json",
    "image_encoder/model.safetensors",
    "image_encoder/pytorch_model.bin",
]
TRANSFORMER_FILES = [
    ".gitattributes",
    "README.md",
    "config.json",
    *_shards("", "diffusion_pytorch_model", 3),
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.pt",
    "model.ckpt",
]
LISTINGS = {
    "hunyuanvideo-community/HunyuanVideo": HUNYUAN_FILES,
    "lllyasviel/flux_redux_bfl": REDUX_FILES,
    "lllyasviel/FramePackI2V_HY": TRANSFORMER_FILES,
    "lllyasviel/FramePack_F1_I2V_HY_20250503": TRANSFORMER_FILES,
}


# ---------------------------------------------------------------------------------------------
# Pure planning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "transformers"),
    [("inverted", ["transformer"]), ("forward", ["transformer_f1"]), ("both", ["transformer", "transformer_f1"])],
)
def test_download_plan(variant, transformers):
    plan = download_plan(variant)
    assert [item.target for item in plan] == SHARED_TARGETS + transformers
    by_target = {item.target: item for item in plan}
    assert by_target["text_encoder"] == DownloadItem("hunyuanvideo-community/HunyuanVideo", "text_encoder", "text_encoder")
    assert by_target["image_encoder"].repo_id == "lllyasviel/flux_redux_bfl"
    assert by_target["feature_extractor"].subfolder == "feature_extractor"
    if "transformer" in by_target:
        assert by_target["transformer"] == DownloadItem("lllyasviel/FramePackI2V_HY", None, "transformer")
    if "transformer_f1" in by_target:
        assert by_target["transformer_f1"] == DownloadItem(
            "lllyasviel/FramePack_F1_I2V_HY_20250503", None, "transformer_f1"
        )


def test_download_plan_rejects_unknown_variant():
    with pytest.raises(ValueError):
        download_plan("sideways")


def _planned(variant: str) -> dict[str, list[tuple[str, str]]]:
    return {item.target: plan_files(item, LISTINGS[item.repo_id]) for item in download_plan(variant)}


def test_plan_files_text_encoder_and_tokenizers():
    planned = _planned("inverted")
    assert planned["text_encoder"] == [
        ("text_encoder/config.json", "text_encoder/config.json"),
        *[(p, p) for p in _shards("text_encoder/", "model", 4)],
        ("text_encoder/model.safetensors.index.json", "text_encoder/model.safetensors.index.json"),
    ]
    assert [local for _, local in planned["text_encoder_2"]] == ["text_encoder_2/config.json", "text_encoder_2/model.safetensors"]
    assert [local for _, local in planned["tokenizer"]] == [
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    ]
    assert [local for _, local in planned["tokenizer_2"]] == [
        "tokenizer_2/merges.txt",
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/tokenizer_config.json",
        "tokenizer_2/vocab.json",
    ]
    assert planned["vae"] == [
        ("vae/config.json", "vae/config.json"),
        ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"),
    ]


def test_plan_files_redux_takes_only_the_image_encoder():
    planned = _planned("forward")
    assert planned["image_encoder"] == [
        ("image_encoder/config.json", "image_encoder/config.json"),
        ("image_encoder/model.safetensors", "image_encoder/model.safetensors"),
    ]
    assert planned["feature_extractor"] == [
        ("feature_extractor/preprocessor_config.json", "feature_extractor/preprocessor_config.json")
    ]


@pytest.mark.parametrize(("variant", "target"), [("inverted", "transformer"), ("forward", "transformer_f1")])
def test_plan_files_transformer_repo_root_goes_to_its_folder(variant, target):
    planned = _planned(variant)[target]
    assert planned == [
        ("config.json", f"{target}/config.json"),
        *[(p, f"{target}/{p}") for p in _shards("", "diffusion_pytorch_model", 3)],
        ("diffusion_pytorch_model.safetensors.index.json", f"{target}/diffusion_pytorch_model.safetensors.index.json"),
    ]


@pytest.mark.parametrize("variant", ["inverted", "forward", "both"])
def test_plan_never_fetches_pickles_or_foreign_files(variant):
    planned = [pair for pairs in _planned(variant).values() for pair in pairs]
    repo_paths = [repo_path for repo_path, _ in planned]
    assert len(repo_paths) == len(set(repo_paths)) or variant == "both"
    for repo_path, local in planned:
        name = repo_path.rsplit("/", 1)[-1]
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in PICKLE_LIKE), repo_path
        assert local.split("/")[0] in {spec.subfolder for spec in PARTS.values()}
    # HunyuanVideo's own transformer, the Redux embedder and repo-level files stay out
    hunyuan_paths = {p for item in download_plan(variant) if item.repo_id.startswith("hunyuan")
                     for p, _ in plan_files(item, HUNYUAN_FILES)}
    assert not any(p.startswith(("transformer/", "scheduler/")) for p in hunyuan_paths)
    assert "flux1-redux-dev.safetensors" not in repo_paths and "model_index.json" not in repo_paths
    assert not any(p.startswith("image_embedder/") for p in repo_paths)


def test_patterns_exclude_every_pickle_format():
    for pattern in PICKLE_LIKE:
        assert pattern in IGNORE_PATTERNS
    assert "*.safetensors" in ALLOW_PATTERNS
    for name in ("pytorch_model.bin", "model.pt", "x.pth", "y.ckpt", "flax_model.msgpack", "tf_model.h5", "model.onnx"):
        assert not download._wanted(name), name
    for name in ("model.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json", "merges.txt"):
        assert download._wanted(name), name


# ---------------------------------------------------------------------------------------------
# The download loop against an in-memory hub
# ---------------------------------------------------------------------------------------------


def _content(repo_path: str, files: list[str]) -> bytes:
    if repo_path.endswith(".safetensors.index.json"):
        folder = repo_path.rsplit("/", 1)[0] + "/" if "/" in repo_path else ""
        stem = repo_path.rsplit("/", 1)[-1].replace(".safetensors.index.json", "")
        shards = [f.rsplit("/", 1)[-1] for f in files if f.startswith(folder + stem + "-") and f.endswith(".safetensors")
                  and "/" not in f[len(folder):]]
        return json.dumps({"metadata": {}, "weight_map": {f"w{i}": s for i, s in enumerate(shards)}}).encode()
    return (repo_path.encode() + b"|") * (1 + len(repo_path) % 7)


class FakeHub:
    """Serves LISTINGS from memory and drives the progress bar class like huggingface_hub does."""

    def __init__(self, events: list[DownloadProgress] | None = None, resume: dict[str, int] | None = None):
        self.files = {repo: {p: _content(p, files) for p in files} for repo, files in LISTINGS.items()}
        self.fetched: list[str] = []
        self.events = events if events is not None else []
        self.events_before_first_fetch: int | None = None
        self.resume = resume or {}

    def list_files(self, repo_id):
        return "0123abc", {path: len(data) for path, data in self.files[repo_id].items()}

    def fetch(self, repo_id, revision, repo_path, staging_dir, tqdm_class):
        assert revision == "0123abc"
        if self.events_before_first_fetch is None:
            self.events_before_first_fetch = len(self.events)
        self.fetched.append(f"{repo_id}:{repo_path}")
        data = self.files[repo_id][repo_path]
        already = self.resume.get(repo_path, 0)
        bar = tqdm_class(total=len(data), initial=already, desc=repo_path)
        for start in range(already, len(data), 7):
            bar.update(len(data[start:start + 7]))
            bar.update_transfer(len(data[start:start + 7]))
        bar.close()
        target = Path(staging_dir) / repo_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target


def _expected_bytes(hub: FakeHub, variant: str) -> int:
    return sum(
        len(hub.files[item.repo_id][repo_path])
        for item in download_plan(variant)
        for repo_path, _ in plan_files(item, LISTINGS[item.repo_id])
    )


def test_download_places_files_and_reports_progress(tmp_path):
    events: list[DownloadProgress] = []
    hub = FakeHub(events)
    models = tmp_path / "models"
    download_models(models, "inverted", on_progress=events.append, hub=hub)

    assert missing_parts(models, "inverted") == []
    assert (models / "transformer" / "diffusion_pytorch_model-00002-of-00003.safetensors").is_file()
    assert not (models / "transformer_f1").exists()
    assert not any(p.suffix in {".bin", ".pt", ".ckpt", ".onnx", ".h5", ".msgpack"} for p in models.rglob("*"))
    assert not any(name.endswith((".bin", ".pt", ".ckpt")) for name in hub.fetched)
    assert (models / "vae" / "config.json").read_bytes() == hub.files["hunyuanvideo-community/HunyuanVideo"]["vae/config.json"]
    assert not (models / ".cache" / "download" / "lllyasviel--FramePackI2V_HY").exists()  # staging cleaned up

    total = _expected_bytes(hub, "inverted")
    # the total is announced before the first byte
    assert hub.events_before_first_fetch >= 1
    first = events[0]
    assert (first.bytes_total, first.bytes_done, first.files_done) == (total, 0, 0)
    assert first.files_total == len(hub.fetched)
    done = [e.bytes_done for e in events]
    assert done == sorted(done) and all(e.bytes_total == total for e in events)
    last = events[-1]
    assert last.finished and last.bytes_done == total and last.fraction == 1.0
    assert last.files_done == last.files_total and last.current_file is None
    assert any(e.bytes_per_second > 0 and e.eta_seconds is not None for e in events[1:-1])


def test_second_run_skips_complete_files_and_refetches_wrong_sizes(tmp_path):
    models = tmp_path / "models"
    download_models(models, "forward", hub=FakeHub())

    hub = FakeHub()
    events: list[DownloadProgress] = []
    download_models(models, "forward", on_progress=events.append, hub=hub)
    assert hub.fetched == []
    assert events[0].bytes_done == events[0].bytes_total > 0 and events[-1].finished

    (models / "vae" / "config.json").write_bytes(b"{}")  # wrong size: an earlier broken copy
    hub = FakeHub()
    download_models(models, "forward", hub=hub)
    assert hub.fetched == ["hunyuanvideo-community/HunyuanVideo:vae/config.json"]


def test_resumed_bytes_count_once(tmp_path):
    path = "diffusion_pytorch_model-00001-of-00003.safetensors"
    events: list[DownloadProgress] = []
    hub = FakeHub(events, resume={path: 20})
    download_models(tmp_path / "models", "inverted", on_progress=events.append, hub=hub)
    total = _expected_bytes(hub, "inverted")
    assert all(e.bytes_done <= total for e in events)
    assert events[-1].bytes_done == total
    # the resumed 20 bytes show up once, as soon as the file starts, and do not count as speed
    resumed = [i for i, e in enumerate(events) if e.current_file == f"transformer/{path}"]
    assert events[resumed[1]].bytes_done - events[resumed[0]].bytes_done == 20


def test_not_enough_disk_space_fails_before_fetching(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: usage(100, 90, 10))
    hub = FakeHub()
    with pytest.raises(DownloadError) as info:
        download_models(tmp_path / "models", "both", hub=hub)
    assert_one_sentence(str(info.value))
    assert "free" in str(info.value)
    assert hub.fetched == []


class _FailingHub(FakeHub):
    def __init__(self, list_error=None, fetch_error=None):
        super().__init__()
        self.list_error, self.fetch_error = list_error, fetch_error

    def list_files(self, repo_id):
        if self.list_error:
            raise self.list_error
        return super().list_files(repo_id)

    def fetch(self, *args, **kwargs):
        if self.fetch_error:
            raise self.fetch_error
        return super().fetch(*args, **kwargs)


def _http_error(cls, status: int):
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/api/models/lllyasviel/FramePackI2V_HY")
    return cls(f"{status} Client Error. Repository Not Found for url: {request.url}.", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("hub_factory", "expected"),
    [
        (lambda: _FailingHub(list_error=__import__("httpx2").ConnectError("[Errno -3] Temporary failure")),
         "Could not reach the Hugging Face hub"),
        (lambda: _FailingHub(list_error=TimeoutError("no answer within 15 s")), "no answer within 15 s"),
        (lambda: _FailingHub(list_error=_http_error(__import__("huggingface_hub").errors.RepositoryNotFoundError, 404)),
         "refused to serve"),
        (lambda: _FailingHub(list_error=__import__("huggingface_hub").errors.OfflineModeIsEnabled("offline")),
         "HF_HUB_OFFLINE"),
        (lambda: _FailingHub(fetch_error=OSError(errno.ENOSPC, "No space left on device")), "ran full"),
        (lambda: _FailingHub(fetch_error=__import__("httpx2").ReadTimeout("read timed out")),
         "Could not reach the Hugging Face hub"),
    ],
)
def test_failures_become_one_sentence(tmp_path, hub_factory, expected):
    models = tmp_path / "models"
    with pytest.raises(DownloadError) as info:
        download_models(models, "inverted", hub=hub_factory())
    message = str(info.value)
    assert_one_sentence(message)
    assert expected in message and str(models) in message
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------------------------------------
# The real hub, which this environment cannot reach: it must fail fast, never retry forever.
# ---------------------------------------------------------------------------------------------


class _ReachedTheHub(BaseException):
    """Raised instead of downloading when a machine can reach the hub after all."""


class _ListOnlyHub(HuggingFaceHub):
    listed = False

    def list_files(self, repo_id):
        result = super().list_files(repo_id)
        self.listed = True
        return result

    def fetch(self, *args, **kwargs):
        raise _ReachedTheHub


@pytest.fixture()
def hub_online(monkeypatch):
    """Undo HF_HUB_OFFLINE (set by conftest) so the request really goes out."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_unreachable_real_hub_fails_fast(tmp_path, hub_online):
    models = tmp_path / "models"
    hub = _ListOnlyHub()
    events: list[DownloadProgress] = []
    started = time.monotonic()
    error = None
    try:
        download_models(models, "both", on_progress=events.append, hub=hub)
    except DownloadError as exc:
        error = exc
    except _ReachedTheHub:
        pass
    elapsed = time.monotonic() - started
    if hub.listed:
        pytest.skip("this machine can reach the Hugging Face hub; the offline failure cannot be observed")
    print(f"unreachable hub: DownloadError after {elapsed:.2f} s: {error}")
    assert error is not None
    assert elapsed < 30
    message = str(error)
    assert_one_sentence(message)
    assert message.startswith("Could not reach the Hugging Face hub to download the models (")
    assert message.endswith(f"check your internet connection or copy an existing model folder to {models}.")
    assert events == []  # nothing was announced because nothing is known
    assert not models.exists()


def test_hanging_name_resolution_is_bounded(tmp_path, hub_online, monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(3)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    monkeypatch.setattr(download, "METADATA_DEADLINE_S", 0.5)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"no answer within 0\.5 s"):
        download_models(tmp_path / "models", "inverted", hub=_ListOnlyHub())
    assert time.monotonic() - started < 2.5
