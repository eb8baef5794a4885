"""Files every layer writes: atomic replacement (temp file + rename), fsync, one-sentence write errors.

Readers (a browser, a player, a resumed job) see either the old or the complete new file, never a
torn one. Temp files end in TMP_SUFFIX so stale ones left by a crash are recognisably ours.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import InputError, OutputFolderError

TMP_SUFFIX = ".fpl-tmp"  # temp files we create; stale ones (after a crash) are ours to delete


def one_line(text: str, limit: int = 160) -> str:
    """One line, no trailing period, so it can sit inside a one-sentence message."""
    text = " ".join(text.split()).rstrip(" .;")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def output_error(target: Path | str, *, exc: BaseException | None = None, stderr: str = "") -> OutputFolderError:
    """Map an OSError and/or ffmpeg's stderr to a one-sentence OutputFolderError."""
    what = "the video" if str(target).endswith(".mp4") else "the file"
    where = f"Could not write {what} {target}"
    code = getattr(exc, "errno", None)
    low = stderr.lower()
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) or "no space left on device" in low or "disk quota" in low:
        return OutputFolderError(f"{where}: the disk is full; free some space and resume the job.")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "permission denied" in low or "read-only file system" in low:
        return OutputFolderError(
            f"{where}: permission denied; choose an outputs folder you can write to and resume the job."
        )
    if code in (errno.ENOENT, errno.ENOTDIR) or "no such file or directory" in low:
        # The job folder itself vanished (deleted while running): nothing is left to resume.
        return OutputFolderError(
            f"{where}: its folder does not exist (it may have been removed while the job ran); start the job again."
        )
    if exc is not None:
        detail = one_line(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
    else:
        # The first line names the cause; later ones are "Task finished ..." follow-ups.
        lines = [re.sub(r"^(\[[^\]]*\]\s*)+", "", ln) for ln in stderr.splitlines()]
        lines = [ln for ln in lines if ln.strip()]
        detail = "ffmpeg: " + one_line(lines[0]) if lines else "ffmpeg failed without a message"
    return OutputFolderError(f"{where} ({detail}); check the outputs folder and resume the job.")


def tmp_path_in(directory: Path, name: str) -> Path:
    """Create an empty temp file next to the target (same filesystem, so os.replace is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=directory)
    os.close(fd)
    return Path(tmp)


def fsync_file(path: Path) -> None:
    # r+b: Windows can only flush handles opened for writing.
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Best effort: make the rename itself durable (not possible on Windows)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_file(tmp: Path, target: Path) -> None:
    # On Windows a player or browser holding the old preview open makes os.replace fail for
    # a moment; retry briefly instead of failing the whole job.
    attempts = 20 if os.name == "nt" else 1
    for i in range(attempts):
        try:
            os.replace(tmp, target)
            break
        except PermissionError as exc:
            if i < attempts - 1:
                time.sleep(0.1)
            elif os.name == "nt" and target.exists():
                raise OutputFolderError(
                    f"Could not write the video to {target}: the file is open in another program; "
                    "close it and resume the job."
                ) from exc
            else:
                raise
    fsync_dir(target.parent)


def unlink_quiet(path: Path | None) -> None:
    if path is None:
        return
    try:
        path.unlink()
    except OSError:
        pass


def atomic_write_bytes(path, data: bytes) -> None:
    """Write data to path so that readers see either the old or the complete new file."""
    target = Path(path)
    tmp: Path | None = None
    try:
        tmp = tmp_path_in(target.parent, target.name)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, target)
        tmp = None
    except OSError as exc:
        raise output_error(target, exc=exc) from exc
    finally:
        unlink_quiet(tmp)


def atomic_write_json(path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def save_png(path, rgb_hwc_uint8: np.ndarray) -> None:
    from PIL import Image  # lazy: keeps importing this module cheap

    arr = np.asarray(rgb_hwc_uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise InputError(f"Cannot save a PNG from an array of shape {arr.shape} and type {arr.dtype}; pass (H, W, 3) uint8.")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def pid_alive(pid: int) -> bool:
    import psutil  # os.kill(pid, 0) would terminate the process on Windows

    return psutil.pid_exists(pid)
