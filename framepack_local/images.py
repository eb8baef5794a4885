"""Loading the user's photo(s) and fitting them to the model's frame size.

Every failure while reading a file becomes an :class:`InputError` whose text is
one sentence telling the user what to do; no PIL/OS traceback reaches them.
Importing this module changes no global PIL or ``warnings`` state.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InputError

log = logging.getLogger(__name__)

# 8192 x 8192 = 67 M pixels. That is twice a 50 MP phone/camera photo, so real
# photos pass, while the decoded RGB copy (~200 MB, several times more for
# 16-bit/float intermediates) stays well inside desktop memory. The model only
# sees a frame of about 640 px anyway. Checked from the header, before any
# pixel data is decoded, so "decompression bombs" cost nothing.
MAX_IMAGE_PIXELS: int = 8192 * 8192

# 200 MB: far above any compressed photo (a 67 MP JPEG is ~30-60 MB), but it
# stops us from reading a huge video or disk image picked by mistake.
MAX_FILE_BYTES: int = 200 * 1024 * 1024

# Formats a photo plausibly comes in. Leaving the rest out keeps PIL from
# running exotic decoders (EPS, for one, shells out to Ghostscript).
ALLOWED_FORMATS: tuple[str, ...] = (
    "JPEG",  # also yields MPO (multi-picture JPEG from phones)
    "PNG",  # also APNG
    "WEBP",
    "GIF",
    "BMP",
    "DIB",
    "TIFF",
    "TGA",
    "PPM",
    "AVIF",
    "JPEG2000",
    "QOI",
    "ICO",
    "PSD",
)

_SUPPORTED_HINT = "use a JPEG, PNG or WebP photo"


def _fail(what: str, path: str, problem: str, advice: str) -> InputError:
    """One sentence: 'The <what> file <path> <problem>; <advice>.'"""
    return InputError(f"The {what} file {path} {problem}; {advice}.")


def load_image(path: str | os.PathLike, *, what: str = "image") -> Image.Image:
    """Read *path* and return a fully loaded 8-bit RGB image, upright per EXIF.

    *what* names the input in error messages ("image", "end image").
    Raises InputError (never a raw PIL/OS error) when the file is unusable.
    """
    try:
        name = os.fspath(path)
    except TypeError as exc:
        raise InputError(f"No {what} file was given; choose a photo.") from exc
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not name:
        raise InputError(f"No {what} file was given; choose a photo.")

    # stat first: clearer messages than PIL's, and no decoding of huge files.
    try:
        st = os.stat(name)
    except FileNotFoundError as exc:
        raise _fail(what, name, "does not exist", "check the path or choose another photo") from exc
    except PermissionError as exc:
        raise _fail(what, name, "cannot be read (permission denied)",
                    "fix its permissions or choose another photo") from exc
    except (OSError, ValueError) as exc:
        raise _fail(what, name, "cannot be accessed", "check the path or choose another photo") from exc
    if stat.S_ISDIR(st.st_mode):
        raise _fail(what, name, "is a folder, not a photo", "choose an image file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise _fail(what, name, "is not a regular file", "choose a photo file")
    if st.st_size == 0:
        raise _fail(what, name, "is empty (0 bytes)", "choose another photo")
    if st.st_size > MAX_FILE_BYTES:
        raise _fail(
            what, name,
            f"is too large ({st.st_size / 1e6:.0f} MB, the limit is {MAX_FILE_BYTES / 1e6:.0f} MB)",
            "choose a smaller photo",
        )

    try:
        fh = open(name, "rb")
    except PermissionError as exc:
        raise _fail(what, name, "cannot be read (permission denied)",
                    "fix its permissions or choose another photo") from exc
    except OSError as exc:
        raise _fail(what, name, "cannot be opened", "check the path or choose another photo") from exc

    with fh:
        # PIL signals a bomb with a warning below 2x its own global limit; make
        # that an exception here only (catch_warnings restores the filters).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(fh, formats=ALLOWED_FORMATS)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise _too_many_pixels(what, name, None) from exc
            except UnidentifiedImageError as exc:
                raise _fail(what, name, "is not an image this app can read", _SUPPORTED_HINT) from exc
            except Exception as exc:  # PIL raises many types on damaged headers
                raise _fail(what, name, "could not be read (it may be damaged)",
                            "choose another photo") from exc

            with img:
                # Our own limit, independent of the global Image.MAX_IMAGE_PIXELS
                # which the host program may have changed or disabled.
                width, height = img.size
                if width <= 0 or height <= 0:
                    raise _fail(what, name, "has no pixels", "choose another photo")
                if width * height > MAX_IMAGE_PIXELS:
                    raise _too_many_pixels(what, name, (width, height))

                n_frames = getattr(img, "n_frames", 1)
                if n_frames > 1:
                    # Animated GIF/WebP/APNG: PIL opens on frame 0, which we use.
                    log.info("%s has %d frames; using the first one", name, n_frames)

                # LOAD_TRUNCATED_IMAGES is left at PIL's default (False), so a
                # cut-off file raises in load() instead of giving grey pixels.
                if ImageFile.LOAD_TRUNCATED_IMAGES:
                    log.warning("PIL LOAD_TRUNCATED_IMAGES was set by the host program; "
                                "truncated files may load partially")
                try:
                    img.load()
                except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                    raise _too_many_pixels(what, name, (width, height)) from exc
                except MemoryError as exc:
                    raise _fail(what, name, "is too large to decode in the available memory",
                                "choose a smaller photo") from exc
                except Exception as exc:  # OSError "truncated", SyntaxError, zlib.error, ...
                    raise _fail(what, name, "is damaged or incomplete and could not be decoded",
                                "choose another photo or export it again") from exc

                img = _apply_exif_orientation(img, name)
                try:
                    rgb = _to_rgb(img)
                except Exception as exc:
                    raise _fail(what, name, f"uses a colour format ({img.mode}) this app cannot convert",
                                "save it again as an ordinary RGB JPEG or PNG") from exc

    log.debug("loaded %s: %dx%d", name, rgb.width, rgb.height)
    return rgb


def _too_many_pixels(what: str, path: str, size: tuple[int, int] | None) -> InputError:
    limit = f"the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"
    if size is not None:
        problem = f"is too large ({size[0]}x{size[1]} pixels, {limit})"
    else:
        problem = f"has too many pixels ({limit})"
    return _fail(what, path, problem, "resize it to a smaller photo first")


def _apply_exif_orientation(img: Image.Image, path: str) -> Image.Image:
    """Turn a phone photo upright; broken EXIF only costs the rotation."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF must not make a viewable photo unusable
        log.warning("could not apply EXIF orientation of %s; using it as stored", path, exc_info=True)
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Return a new 8-bit RGB image, independent of the opened file."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_uint8(img)).convert("RGB")
    if mode == "1":
        img = img.convert("L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.has_transparency_data:
        # Transparent areas become white, as they look in most viewers.
        rgba = img.convert("RGBA") if mode != "La" else img.convert("LA").convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img.copy()
    # P, L, CMYK (PIL undoes Adobe's inverted CMYK on JPEG load), YCbCr, ...
    return img.convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale 16-bit / 32-bit int / float greyscale to 0..255 (not clip)."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        hi = float(a.max()) if a.size else 0.0
        if hi <= 1.0:  # the usual 0..1 float convention
            a = a * 255.0
        elif hi > 255.0:  # unknown range: stretch the brightest value to white
            a = a * (255.0 / hi)
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    hi = int(a.max()) if a.size else 0
    if img.mode == "I" and hi > 65535:
        # 32-bit data with no fixed range: stretch to the brightest value.
        a = np.clip(a, 0, None)
        return ((a * 255 + hi // 2) // hi).astype(np.uint8)
    # 16-bit: 65535 -> 255, round to nearest (x * 255 / 65535 == x / 257).
    a = np.clip(a, 0, 65535)
    return ((a + 128) // 257).astype(np.uint8)


def cover_resize_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Scale *image* until it covers height x width (LANCZOS), then crop the centre.

    Returns a new uint8 array of shape (height, width, 3).
    """
    if isinstance(height, bool) or isinstance(width, bool) or not (
        isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))
    ) or height <= 0 or width <= 0:
        raise InputError(f"The frame size {height}x{width} is not valid; use a positive height and width.")
    height, width = int(height), int(width)
    if image.mode != "RGB":
        image = _to_rgb(image)

    src_w, src_h = image.size
    # "cover": the larger of the two scales, so both sides reach the target.
    scale = max(width / src_w, height / src_h)
    new_w = max(width, round(src_w * scale))
    new_h = max(height, round(src_h * scale))
    if (new_w, new_h) != (src_w, src_h):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)

    left = (new_w - width) // 2
    top = (new_h - height) // 2
    cropped = image.crop((left, top, left + width, top + height))
    out = np.array(cropped, dtype=np.uint8)
    assert out.shape == (height, width, 3), out.shape
    return out


def calibration_picture(width: int = 832, height: int = 480) -> Image.Image:
    """A fixed photo-like test picture (soft gradient sky, ground, a round subject) for runs that need
    an image but not the user's: the MagCache calibration measures the transformer, not the photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([0.45 + 0.3 * y / height, 0.6 + 0.2 * y / height, np.full_like(y, 0.9)], axis=-1)
    ground = np.stack([0.35 + 0.1 * x / width, 0.5 - 0.1 * y / height, np.full_like(y, 0.25)], axis=-1)
    rgb = np.where((y > height * 0.62)[..., None], ground, sky)
    subject = (x - width * 0.5) ** 2 + (y - height * 0.45) ** 2 < (height * 0.22) ** 2
    rgb[subject] = (0.85, 0.62, 0.5)
    return Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8))
