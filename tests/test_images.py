"""Tests for framepack_local.images: every image is generated in tmp_path."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from framepack_local import images
from framepack_local.errors import InputError
from framepack_local.images import cover_resize_crop, load_image


# ---------------------------------------------------------------- helpers


def assert_one_sentence(err: InputError, path: Path | str) -> str:
    msg = str(err)
    assert "\n" not in msg
    assert msg.endswith(".")
    assert msg[0].isupper()
    assert ". " not in msg  # one sentence, not two
    assert os.path.basename(str(path)) in msg
    assert "Traceback" not in msg
    return msg


def refused(path: Path, **kw) -> str:
    with pytest.raises(InputError) as info:
        load_image(path, **kw)
    return assert_one_sentence(info.value, path)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature + IHDR claiming width x height, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def noise(size=(64, 48), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = len(mode)
    arr = rng.integers(0, 256, size=(size[1], size[0], bands), dtype=np.uint8)
    return Image.fromarray(arr if bands > 1 else arr[..., 0])


def px(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    return tuple(img.getpixel(xy))


def close(a, b, tol=8) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


# ---------------------------------------------------------------- refused inputs


def test_missing_file(tmp_path):
    msg = refused(tmp_path / "nope.png")
    assert "does not exist" in msg


def test_directory(tmp_path):
    folder = tmp_path / "holiday.png"
    folder.mkdir()
    msg = refused(folder)
    assert "folder" in msg


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    msg = refused(p)
    assert "empty" in msg and "0 bytes" in msg


def test_text_file_is_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n" * 20)
    msg = refused(p)
    assert "not an image" in msg


def test_eps_is_refused_without_running_ghostscript(tmp_path):
    p = tmp_path / "drawing.eps"
    p.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    msg = refused(p)
    assert "not an image" in msg


def test_truncated_png(tmp_path):
    full = tmp_path / "full.png"
    noise((200, 200)).save(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    msg = refused(cut)
    assert "damaged or incomplete" in msg


def test_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    noise((200, 200)).save(full, quality=95)
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    msg = refused(cut)
    assert "damaged or incomplete" in msg


def test_import_leaves_pil_global_state_alone():
    code = (
        "from PIL import Image, ImageFile; Image.init();"
        "before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS);"
        "import framepack_local.images;"
        "after = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS);"
        "assert before == after == (False, before[1]), (before, after);"
        "print('ok')"
    )
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_over_max_pixels_refused_from_header(tmp_path, monkeypatch):
    # 9000 x 9000 = 81 M > 67 M but < PIL's own 89 M warning level: only our check fires.
    p = png_header_only(tmp_path / "huge.png", 9000, 9000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # host disabled PIL's check
    msg = refused(p)
    assert "too large" in msg and "9000x9000" in msg


def test_own_limit_used_not_pil_global(tmp_path, monkeypatch):
    p = tmp_path / "small.png"
    noise((20, 20)).save(p)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 399)
    msg = refused(p)
    assert "20x20" in msg
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 400)
    assert load_image(p).size == (20, 20)


@pytest.mark.parametrize("side", [10000, 20000])  # PIL warning level / PIL error level
def test_pil_decompression_bomb_becomes_input_error(tmp_path, monkeypatch, side):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10**12)  # only PIL's own check left
    p = png_header_only(tmp_path / f"bomb{side}.png", side, side)
    msg = refused(p)
    assert "pixels" in msg


def test_file_size_cap(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    noise((64, 64)).save(p)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", p.stat().st_size - 1)
    msg = refused(p)
    assert "too large" in msg and "MB" in msg


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_real_permissions(tmp_path):
    p = tmp_path / "secret.png"
    noise().save(p)
    p.chmod(0)
    try:
        msg = refused(p)
    finally:
        p.chmod(0o644)
    assert "permission" in msg


def test_unreadable_file_permission_error(tmp_path, monkeypatch):
    p = tmp_path / "secret.png"
    noise().save(p)

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(images, "open", deny, raising=False)  # shadows builtins.open there
    msg = refused(p)
    assert "permission" in msg


def test_what_names_the_input(tmp_path):
    msg = refused(tmp_path / "last.png", what="end image")
    assert msg.startswith("The end image file")


# ---------------------------------------------------------------- accepted inputs


def test_plain_rgb_png_exact(tmp_path):
    p = tmp_path / "rgb.png"
    src = noise((33, 17))
    src.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (33, 17)
    assert np.array_equal(np.asarray(out), np.asarray(src))
    out.load()  # fully loaded and independent of the (closed) file
    p.unlink()
    assert px(out) == px(src)


def test_accepts_pathlike_and_str(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (5, 5), (1, 2, 3)).save(p)
    assert px(load_image(str(p))) == px(load_image(p)) == (1, 2, 3)


def test_exif_orientation_6_turns_portrait(tmp_path):
    # 40x20 stored sideways: left half red, right half blue. Orientation 6 =
    # rotate 90 deg clockwise for display, so red ends up on top.
    src = Image.new("RGB", (40, 20), (255, 0, 0))
    src.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "phone.jpg"
    src.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.mode == "RGB"
    assert out.size == (20, 40)
    assert close(px(out, (10, 5)), (255, 0, 0), 30)
    assert close(px(out, (10, 35)), (0, 0, 255), 30)


def test_rgba_transparent_becomes_white(tmp_path):
    src = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    src.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    src.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black
    p = tmp_path / "logo.png"
    src.save(p)
    out = load_image(p)
    assert out.mode == "RGB"
    assert px(out, (0, 0)) == (255, 255, 255)
    assert close(px(out, (1, 0)), (127, 127, 127), 2)
    assert px(out, (2, 2)) == (255, 0, 0)


def test_la_transparent_becomes_white(tmp_path):
    src = Image.new("LA", (4, 4), (50, 255))
    src.putpixel((0, 0), (0, 0))
    p = tmp_path / "gray_alpha.png"
    src.save(p)
    out = load_image(p)
    assert out.mode == "RGB"
    assert px(out, (0, 0)) == (255, 255, 255)
    assert px(out, (3, 3)) == (50, 50, 50)


def test_palette_with_transparency_becomes_white(tmp_path):
    src = Image.new("P", (4, 4), 1)
    src.putpalette([0, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 6))
    src.putpixel((0, 0), 0)
    p = tmp_path / "pal_t.png"
    src.save(p, transparency=0)
    assert Image.open(p).mode == "P"
    out = load_image(p)
    assert out.mode == "RGB"
    assert px(out, (0, 0)) == (255, 255, 255)  # index 0 is transparent black
    assert px(out, (2, 2)) == (0, 200, 0)


def test_palette_png(tmp_path):
    src = Image.new("P", (4, 4), 2)
    src.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 9))
    src.putpixel((0, 0), 1)
    p = tmp_path / "pal.png"
    src.save(p)
    out = load_image(p)
    assert out.mode == "RGB"
    assert px(out, (0, 0)) == (10, 20, 30)
    assert px(out, (1, 1)) == (200, 100, 50)


def test_grayscale_png(tmp_path):
    p = tmp_path / "gray.png"
    Image.new("L", (6, 3), 100).save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (6, 3)
    assert px(out) == (100, 100, 100)


def test_one_bit_png(tmp_path):
    src = Image.new("1", (8, 8), 0)
    src.putpixel((7, 7), 1)
    p = tmp_path / "bw.png"
    src.save(p)
    assert Image.open(p).mode == "1"
    out = load_image(p)
    assert out.mode == "RGB"
    assert px(out, (0, 0)) == (0, 0, 0)
    assert px(out, (7, 7)) == (255, 255, 255)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[65535, 0, 128 * 257, 300]], dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode in ("I;16", "I")  # really a 16-bit file
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (4, 1)
    assert [px(out, (x, 0))[0] for x in range(4)] == [255, 0, 128, 1]
    assert px(out, (0, 0)) == (255, 255, 255)


def test_thirty_two_bit_int_tiff(tmp_path):
    # Mode "I" within the 16-bit range is read as 16-bit data.
    arr = np.array([[65535, 257 * 10]], dtype=np.int32)
    p = tmp_path / "int32.tif"
    Image.fromarray(arr).save(p)
    out = load_image(p)
    assert out.mode == "RGB"
    assert [px(out, (x, 0))[0] for x in range(2)] == [255, 10]


def test_float_tiff(tmp_path):
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    p = tmp_path / "float.tif"
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode == "F"
    out = load_image(p)
    assert out.mode == "RGB"
    assert [px(out, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg_pure_cyan(tmp_path):
    p = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = load_image(p)
    assert out.mode == "RGB"
    assert close(px(out, (8, 8)), (0, 255, 255), 12)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(p).n_frames == 2
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (10, 10)
    assert px(out, (5, 5)) == (255, 0, 0)


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in ((0, 200, 0), (0, 0, 255))]
    p = tmp_path / "anim.webp"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert Image.open(p).n_frames == 2
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (10, 10)
    assert close(px(out, (5, 5)), (0, 200, 0), 4)


def test_tiny_photo_is_accepted_and_upsampled(tmp_path):
    p = tmp_path / "tiny.png"
    Image.new("RGB", (8, 8), (10, 120, 230)).save(p)
    out = load_image(p)
    assert out.size == (8, 8)
    arr = cover_resize_crop(out, 64, 96)
    assert arr.shape == (64, 96, 3) and arr.dtype == np.uint8
    assert close(arr[32, 48], (10, 120, 230), 2)


# ---------------------------------------------------------------- cover_resize_crop


@pytest.mark.parametrize(
    "src_size, target_hw",
    [((200, 100), (64, 64)), ((100, 200), (96, 48)), ((3, 5), (480, 640)), ((640, 480), (480, 640))],
)
def test_cover_resize_crop_shapes(src_size, target_hw):
    arr = cover_resize_crop(noise(src_size), *target_hw)
    assert arr.shape == (*target_hw, 3)
    assert arr.dtype == np.uint8


def test_cover_resize_crop_keeps_centre_of_wide_image():
    src = Image.new("RGB", (300, 100), (0, 255, 0))
    src.paste((255, 0, 0), (0, 0, 100, 100))  # red left third
    src.paste((0, 0, 255), (200, 0, 300, 100))  # blue right third
    arr = cover_resize_crop(src, 50, 50)  # scale 0.5 -> 150x50, crop x 50..100
    assert arr.shape == (50, 50, 3)
    # LANCZOS rings a few pixels at the edges; the inner area is pure green.
    inner = arr[:, 5:-5].reshape(-1, 3).astype(int)
    assert np.abs(inner - [0, 255, 0]).max() <= 3


def test_cover_resize_crop_keeps_centre_of_tall_image():
    src = Image.new("RGB", (100, 300), (0, 255, 0))
    src.paste((255, 0, 0), (0, 0, 100, 100))  # red top third
    src.paste((0, 0, 255), (0, 200, 100, 300))  # blue bottom third
    arr = cover_resize_crop(src, 100, 100)  # no scaling, crop y 100..200
    assert np.array_equal(arr, np.full((100, 100, 3), (0, 255, 0), dtype=np.uint8))


def test_cover_resize_crop_covers_without_borders():
    # A 2:1 source into 1:2 target must be scaled up to cover, never padded.
    src = Image.new("RGB", (40, 20), (200, 10, 10))
    arr = cover_resize_crop(src, 80, 40)
    assert arr.shape == (80, 40, 3)
    assert np.abs(arr.astype(int) - [200, 10, 10]).max() <= 2


def test_cover_resize_crop_converts_non_rgb():
    arr = cover_resize_crop(Image.new("RGBA", (10, 10), (0, 0, 0, 0)), 4, 4)
    assert arr.shape == (4, 4, 3)
    assert (arr == 255).all()


@pytest.mark.parametrize("hw", [(0, 10), (10, -1), (1.5, 10)])
def test_cover_resize_crop_bad_size(hw):
    with pytest.raises(InputError) as info:
        cover_resize_crop(Image.new("RGB", (4, 4)), *hw)
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith(".")
