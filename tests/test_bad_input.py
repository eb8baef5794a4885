"""Every bad input ends with exit code 2 and one sentence on stderr, and leaves no job folder behind."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from framepack_local.__main__ import main
from framepack_local.errors import InputError
from framepack_local.params import JobParams

REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("Error:")]


def assert_one_sentence(lines, *fragments):
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.endswith(".") and "Traceback" not in line
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture
def outputs(tmp_path):
    return tmp_path / "outputs"


@pytest.fixture
def gen(capsys, tiny_model_dir, photo, outputs):
    def run(*extra, image=None, models=None, outs=None):
        args = ["generate", "--image", str(image or photo), "--models", str(models or tiny_model_dir),
                "--outputs", str(outs or outputs), "--seconds", "0.2", "--steps", "1", "--window", "2",
                "--resolution", "64", *extra]
        return run_cli(capsys, *args)
    return run


def no_job_folders(outputs):
    return not outputs.exists() or not [p for p in outputs.iterdir() if p.is_dir()]


@pytest.mark.parametrize("flag,value,fragment", [
    ("--seconds", "abc", "not a number"),
    ("--seconds", "0", "seconds"),
    ("--seconds", "3601", "seconds"),
    ("--seconds", "nan", "not a finite number"),
    ("--steps", "0", "steps"),
    ("--steps", "2.5", "not a whole number"),
    ("--steps", "1000", "steps"),
    ("--window", "0", "window"),
    ("--window", "34", "window"),
    ("--distilled-cfg", "-1", "distilled_cfg"),
    ("--cfg", "100", "cfg"),
    ("--cfg-rescale", "2", "cfg_rescale"),
    ("--seed", "-1", "seed"),
    ("--seed", str(2**63), "seed"),
    ("--seed", "x", "not a whole number"),
    ("--resolution", "32", "resolution"),
    ("--crf", "60", "crf"),
])
def test_bad_numbers(gen, outputs, flag, value, fragment):
    code, lines = gen(flag, value)
    assert code == 2
    assert_one_sentence(lines, fragment)
    assert no_job_folders(outputs)


def test_missing_image(gen, outputs, tmp_path):
    code, lines = gen(image=tmp_path / "nope.png")
    assert code == 2
    assert_one_sentence(lines, "nope.png")
    assert no_job_folders(outputs)


def _write(path, data):
    path.write_bytes(data)
    return path


def test_not_an_image_zero_byte_truncated_and_huge(gen, outputs, tmp_path, photo):
    text = _write(tmp_path / "notes.png", b"hello, this is text, not a picture\n" * 20)
    empty = _write(tmp_path / "empty.jpg", b"")
    whole = Path(photo).read_bytes()
    cut = _write(tmp_path / "cut.png", whole[: len(whole) // 2])
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 9000)).save(huge)  # 81 Mpx, over the 67 Mpx limit, but a tiny file
    for path in (text, empty, cut, huge):
        code, lines = gen(image=path)
        assert code == 2, path
        assert_one_sentence(lines, path.name)
    assert no_job_folders(outputs)


def test_model_folder_missing_or_incomplete(gen, outputs, tmp_path, tiny_model_dir):
    code, lines = gen(models=tmp_path / "no-models")
    assert code == 2
    assert_one_sentence(lines, "download")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial)
    shutil.rmtree(partial / "vae")
    code, lines = gen(models=partial)
    assert code == 2
    assert_one_sentence(lines, "vae", "download")
    code, lines = gen("--mode", "forward", models=tmp_path / "no-models")
    assert code == 2
    assert no_job_folders(outputs)


def test_outputs_not_writable(gen, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, lines = gen(outs=blocker / "sub")
    assert code == 2
    assert_one_sentence(lines, "--outputs")


def test_end_image_in_forward_mode(gen, end_photo, outputs):
    code, lines = gen("--mode", "forward", "--end-image", str(end_photo))
    assert code == 2
    assert_one_sentence(lines, "inverted")


def test_api_raises_typed_error():
    with pytest.raises(InputError):
        JobParams(image="x.png", steps=0).validate()
    with pytest.raises(InputError):
        JobParams(image="x.png", seconds=True).validate()


def test_cli_subprocess_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "framepack_local", "generate", "--image", str(tmp_path / "x.png"),
                           "--seconds", "five"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "five" in proc.stderr


@pytest.mark.parametrize("kind", ["rgba", "palette", "gray16", "cmyk", "exif", "gif", "tiny"])
def test_unusual_images_are_accepted(capsys, tiny_model_dir, tmp_path, kind):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    path = tmp_path / f"{kind}.png"
    if kind == "rgba":
        img.convert("RGBA").save(path)
    elif kind == "palette":
        img.convert("P").save(path)
    elif kind == "gray16":
        Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(path)
    elif kind == "cmyk":
        path = path.with_suffix(".jpg")
        img.convert("CMYK").save(path)
    elif kind == "exif":
        path = path.with_suffix(".jpg")
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(path, exif=exif)
    elif kind == "gif":
        path = path.with_suffix(".gif")
        img.save(path, save_all=True, append_images=[Image.fromarray(255 - rgb)], duration=100)
    elif kind == "tiny":
        img.resize((6, 4)).save(path)
    code, lines = run_cli(capsys, "generate", "--image", str(path), "--models", str(tiny_model_dir),
                          "--outputs", str(tmp_path / "out"), "--seconds", "0.2", "--steps", "1",
                          "--window", "1", "--resolution", "64", "--prompt", "")
    assert code == 0 and not lines
    if kind == "exif":  # rotated to portrait before choosing the bucket
        job = next((tmp_path / "out").iterdir())
        h, w = np.asarray(Image.open(job / "input.png")).shape[:2]
        assert h > w
