"""Writing and reading mp4 files with the ffmpeg binary shipped by imageio-ffmpeg.

Previews are published after every section.  To keep the total preview cost linear in the
video length, every batch of finished frames is encoded exactly once into its own segment
file; publishing only stream-copies the segments (plus a small, re-encoded "pending" piece
at the growing edge) into the target mp4 with ffmpeg's concat demuxer.

Pure Python + subprocess: no torch, and nothing runs at import time.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import InputError, OutputFolderError
from ..files import TMP_SUFFIX, atomic_write_bytes, fsync_file, one_line, output_error, replace_file, tmp_path_in, unlink_quiet

log = logging.getLogger(__name__)

# Every segment is encoded with exactly these settings (only the frames differ) so that the
# H.264 parameter sets match and concat with `-c copy` yields a valid stream.
_X264_PRESET = "medium"
_PIX_FMT = "yuv420p"  # the only 4:2:0 layout every browser and player decodes
# Convert and tag with BT.709 explicitly; untagged files are guessed differently by players.
# setparams is needed: recent ffmpeg takes the tags from the frames, not from -color_* options.
_VIDEO_FILTER = (
    f"scale=out_color_matrix=bt709:out_range=tv,format={_PIX_FMT},"
    "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv"
)

_STATE_VERSION = 1
_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # no console pop-ups on Windows


# --------------------------------------------------------------------------- ffmpeg


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg (or IMAGEIO_FFMPEG_EXE)."""
    try:
        import imageio_ffmpeg  # lazy: nothing runs at import time

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # the package raises RuntimeError when no binary is found
        raise OutputFolderError(
            "Could not find the ffmpeg program; reinstall FramePack Local's Python packages (imageio-ffmpeg)."
        ) from exc


def _url(path: Path) -> str:
    # "file:" stops ffmpeg from reading "name:with:colons" as a protocol; forward slashes let
    # the concat demuxer resolve the relative segment names against the list's folder on Windows too.
    return "file:" + Path(path).absolute().as_posix()


def _run_ffmpeg(args: list[str], *, feed: Iterable[np.ndarray] | None = None, capture_stdout: bool = False):
    """Run ffmpeg; returns (returncode, stderr_text, stdout_text).

    stderr goes to a temp file rather than a pipe so a chatty ffmpeg can never dead-lock
    against us writing frames into its stdin.
    """
    cmd = [ffmpeg_exe(), "-hide_banner", *([] if feed is not None else ["-nostdin"]), *args]
    log.debug("ffmpeg: %s", subprocess.list2cmdline(cmd))
    with tempfile.TemporaryFile() as err_f:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
                stderr=err_f,
                creationflags=_NO_WINDOW,
            )
        except OSError as exc:
            raise OutputFolderError(
                f"Could not start ffmpeg ({one_line(str(exc))}); reinstall FramePack Local's Python packages (imageio-ffmpeg)."
            ) from exc
        out_text = ""
        try:
            if feed is not None:
                assert proc.stdin is not None
                try:
                    for chunk in feed:
                        proc.stdin.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
                except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                    # ffmpeg died early; its stderr says why, reported below.
                    log.debug("ffmpeg stdin closed early: %s", exc)
                finally:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
            if capture_stdout:
                assert proc.stdout is not None
                out_text = proc.stdout.read().decode("utf-8", "replace")
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err_f.seek(0)
        err_text = err_f.read().decode("utf-8", "replace")
    if err_text.strip():
        log.debug("ffmpeg exited %s, stderr:\n%s", rc, err_text)
    return rc, err_text, out_text


def _write_with_ffmpeg(target: Path, args_before_output: list[str], feed: Iterable[np.ndarray] | None = None) -> None:
    """Run ffmpeg into a temp file beside target, then fsync and os.replace it into place."""
    target = Path(target)
    tmp: Path | None = None
    try:
        try:
            tmp = tmp_path_in(target.parent, target.name)
        except OSError as exc:
            raise output_error(target, exc=exc) from exc
        # -f mp4: the temp name has no .mp4 extension to guess the muxer from.
        # -xerror: without it ffmpeg exits 0 after skipping an unreadable concat input,
        # silently publishing a shorter video.
        rc, err, _ = _run_ffmpeg(["-xerror", *args_before_output, "-f", "mp4", "-y", _url(tmp)], feed=feed)
        if rc != 0:
            raise output_error(target, stderr=err)
        try:
            fsync_file(tmp)
            replace_file(tmp, target)
        except OSError as exc:
            raise output_error(target, exc=exc) from exc
        tmp = None
    finally:
        unlink_quiet(tmp)


def _check_frames(frames: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[3] != 3 or arr.dtype != np.uint8:
        raise InputError(f"Cannot encode {what} of shape {arr.shape} and type {arr.dtype}; pass (T, H, W, 3) uint8 frames.")
    if arr.shape[0] == 0:
        raise InputError(f"Cannot encode {what} without frames; pass at least one frame.")
    _check_size(arr.shape[1], arr.shape[2])
    return arr


def _check_size(height: int, width: int) -> None:
    # yuv420p halves the chroma resolution, so libx264 refuses odd sizes with a cryptic error.
    if height % 2 or width % 2 or height < 2 or width < 2:
        raise InputError(
            f"Cannot encode frames of {width}x{height} pixels; width and height must be even (multiples of 16 are best)."
        )


def _chunks(frames) -> Iterator[np.ndarray]:
    """Yield (T, H, W, 3) uint8 chunks from an array or from an iterable of HWC frames / THWC chunks."""
    if isinstance(frames, np.ndarray):
        yield _check_frames(frames, "frames")
        return
    for item in frames:
        arr = np.asarray(item)
        yield _check_frames(arr[None] if arr.ndim == 3 else arr, "frames")


def _x264_args(fps: int, crf: int) -> list[str]:
    return [
        "-an",
        "-vf", _VIDEO_FILTER,
        "-c:v", "libx264",
        "-preset", _X264_PRESET,
        "-crf", str(int(crf)),
        # No B-frames: x264 gives 1-2 frame encodes no reorder delay but longer ones a 2-frame
        # delay, and concatenating such mixed segments breaks the timestamps. Costs ~0-8% size at CRF 16.
        "-bf", "0",
        "-pix_fmt", _PIX_FMT,
        "-r", str(int(fps)),
        "-movflags", "+faststart",  # moov first: browsers can start playing before the end arrives
    ]


def encode_frames(path, frames_thwc_uint8, fps: int = 30, crf: int = 16) -> None:
    """Encode frames to an H.264 mp4 (atomic).

    frames: a (T, H, W, 3) uint8 array, or an iterable of (H, W, 3) frames / (T, H, W, 3)
    chunks so a long video can be streamed through one ffmpeg process without holding it in RAM.
    """
    chunks = _chunks(frames_thwc_uint8)
    try:
        first = next(chunks)
    except StopIteration:
        raise InputError("Cannot encode a video without frames; pass at least one frame.") from None
    _, height, width, _ = first.shape

    def feed() -> Iterator[np.ndarray]:
        yield first
        for chunk in chunks:
            if chunk.shape[1:] != first.shape[1:]:
                raise InputError(
                    f"Cannot encode frames of {chunk.shape[2]}x{chunk.shape[1]} pixels into a video of {width}x{height}; "
                    "all frames must have the same size."
                )
            yield chunk

    args = [
        "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(int(fps)),
        "-i", "pipe:0",
        *_x264_args(fps, crf),
    ]
    _write_with_ffmpeg(Path(path), args, feed=feed())


# --------------------------------------------------------------------------- segmented video


def _concat_line(rel: str) -> str:
    # Relative names of [A-Za-z0-9_./-] pass concat's "safe" mode, whatever the work dir is called.
    return f"file '{rel}'\n"


class SegmentedVideo:
    """A growing video kept as once-encoded segments; publishing stream-copies them.

    prepend=True is the inverted mode: sections are generated from the end of the video
    backwards, so new finished frames (and the pending piece) go at the front.
    """

    SEGMENT_DIR = "segments"
    PENDING_NAME = "pending.mp4"
    LIST_NAME = "concat.txt"

    def __init__(self, work_dir, *, fps: int = 30, crf: int = 16, prepend: bool):
        self.work_dir = Path(work_dir)
        self.fps = int(fps)
        self.crf = int(crf)
        self.prepend = bool(prepend)
        self._segments: list[dict] = []  # time order: {"file": rel path, "frames": n, "bytes": n}
        self._pending: dict | None = None
        self._next_index = 0
        self._size: tuple[int, int] | None = None  # (height, width) shared by every segment
        self.last_published_frames = 0  # frames in the file the last publish() wrote
        seg_dir = self.work_dir / self.SEGMENT_DIR
        try:
            seg_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(seg_dir, exc=exc) from exc
        # Leftovers of an encode interrupted by a crash: ours (by suffix) and never referenced.
        for stale in seg_dir.glob("*" + TMP_SUFFIX):
            unlink_quiet(stale)

    # ---- state

    @property
    def frame_count(self) -> int:
        return sum(s["frames"] for s in self._segments) + (self._pending["frames"] if self._pending else 0)

    @property
    def finished_frame_count(self) -> int:
        return sum(s["frames"] for s in self._segments)

    @property
    def segment_paths(self) -> list[Path]:
        """Finished segment files in time order (the pending piece excluded)."""
        return [self.work_dir / s["file"] for s in self._segments]

    def state(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "fps": self.fps,
            "crf": self.crf,
            "prepend": self.prepend,
            "height": self._size[0] if self._size else None,
            "width": self._size[1] if self._size else None,
            "next_index": self._next_index,
            "segments": [dict(s) for s in self._segments],
            "pending": dict(self._pending) if self._pending else None,
        }

    @classmethod
    def from_state(cls, work_dir, state: dict, fps: int = 30, crf: int = 16, prepend: bool = False) -> "SegmentedVideo":
        """Resume from state() without re-encoding anything; checks the files are still there."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise InputError("Cannot resume this job: its saved video state is from another version; start the job again.")
        if int(state.get("fps", fps)) != int(fps):
            # Segments with another frame rate cannot be stream-copied into one video.
            raise InputError(
                f"Cannot resume this job at {fps} fps: it was started at {state['fps']} fps; resume it with the same frame rate."
            )
        if bool(state.get("prepend", prepend)) != bool(prepend):
            raise InputError("Cannot resume this job with another generation direction; resume it with the same settings.")
        video = cls(work_dir, fps=fps, crf=crf, prepend=prepend)
        entries = [dict(s) for s in state.get("segments", [])]
        pending = dict(state["pending"]) if state.get("pending") else None
        if pending:
            p = video.work_dir / pending["file"]
            if not p.is_file() or ("bytes" in pending and p.stat().st_size != pending["bytes"]):
                # Overwritten or removed by a publish that never got recorded; the edge is rebuilt
                # from the latents on resume, so the old piece is simply dropped.
                log.info("dropping the unrecorded pending piece %s", p.name)
                pending = None
        for entry in entries:
            p = video.work_dir / entry["file"]
            size = p.stat().st_size if p.is_file() else None
            if size is None or ("bytes" in entry and size != entry["bytes"]):
                raise OutputFolderError(
                    f"Cannot resume the job in {video.work_dir}: the video piece {p.name} is missing or damaged; start the job again."
                )
        video._segments = entries
        video._pending = pending
        video._next_index = int(state.get("next_index", len(entries)))
        if state.get("height") and state.get("width"):
            video._size = (int(state["height"]), int(state["width"]))
        return video

    # ---- growing

    def _encode_piece(self, frames: np.ndarray, name: str) -> dict:
        arr = _check_frames(frames, "a video section")
        size = (arr.shape[1], arr.shape[2])
        if self._size is not None and size != self._size:
            raise InputError(
                f"Cannot add frames of {size[1]}x{size[0]} pixels to a video of {self._size[1]}x{self._size[0]}; "
                "all sections must have the same size."
            )
        rel = f"{self.SEGMENT_DIR}/{name}"
        path = self.work_dir / rel
        encode_frames(path, arr, fps=self.fps, crf=self.crf)
        self._size = size
        return {"file": rel, "frames": int(arr.shape[0]), "bytes": path.stat().st_size}

    def add_finished(self, frames_thwc_uint8: np.ndarray) -> None:
        """Encode one batch of finished frames into a new segment (once, never again); no frames: no-op."""
        if np.asarray(frames_thwc_uint8).shape[:1] == (0,):
            return
        entry = self._encode_piece(frames_thwc_uint8, f"seg_{self._next_index:05d}.mp4")
        self._next_index += 1
        if self.prepend:
            self._segments.insert(0, entry)
        else:
            self._segments.append(entry)

    def set_pending(self, frames_thwc_uint8: np.ndarray | None) -> None:
        """Replace the still-changing piece at the growing edge; None (or no frames) removes it."""
        if frames_thwc_uint8 is None or np.asarray(frames_thwc_uint8).shape[:1] == (0,):
            if self._pending is not None:
                unlink_quiet(self.work_dir / self._pending["file"])
            self._pending = None
            return
        self._pending = self._encode_piece(frames_thwc_uint8, self.PENDING_NAME)

    def _ordered(self) -> list[dict]:
        if self._pending is None:
            return list(self._segments)
        return [self._pending, *self._segments] if self.prepend else [*self._segments, self._pending]

    def edge_pieces(self, frames: int) -> list[dict]:
        """The pieces at the growing edge (the front in inverted mode) that hold at least `frames` frames."""
        pieces = self._ordered()
        if self.prepend:
            pieces = pieces[::-1]
        chosen, total = [], 0
        while pieces and total < frames:
            piece = pieces.pop()  # from the growing edge inwards
            chosen.append(piece)
            total += piece["frames"]
        return chosen if self.prepend else chosen[::-1]  # back in time order

    def publish(self, out_path, metadata: dict | None = None, latest_frames: int | None = None) -> Path:
        """Stream-copy all pieces, in time order, into out_path (atomic) and return it.

        latest_frames: only the pieces at the growing edge holding at least that many frames (the
        "latest minute" of a long job), so a publish costs the same however long the video is.
        """
        target = Path(out_path)
        pieces = self._ordered() if latest_frames is None else self.edge_pieces(latest_frames)
        if not pieces:
            raise InputError("Cannot publish a video before any frames were added; add frames first.")
        for piece in pieces:
            # Cheap check (a stat per segment) so a deleted or truncated piece is named clearly.
            p = self.work_dir / piece["file"]
            if not p.is_file() or ("bytes" in piece and p.stat().st_size != piece["bytes"]):
                raise OutputFolderError(
                    f"Could not write the video to {target}: the video piece {piece['file']} in {self.work_dir} "
                    "is missing or damaged; start the job again."
                )
        list_path = self.work_dir / self.LIST_NAME
        atomic_write_bytes(list_path, "".join(_concat_line(p["file"]) for p in pieces).encode("utf-8"))
        args = [
            "-loglevel", "error",
            "-f", "concat", "-safe", "1", "-i", _url(list_path),
            "-map", "0:v:0", "-c", "copy",
            "-map_metadata", "-1",  # drop the per-segment tags; only ours below
            "-movflags", "+faststart",
        ]
        if metadata is not None:
            # Compact one-line JSON: `ffmpeg -i` prints it back verbatim as "comment : ...".
            args += ["-metadata", "comment=" + json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))]
        _write_with_ffmpeg(target, args)
        self.last_published_frames = sum(p["frames"] for p in pieces)
        return target


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float
    duration_s: float
    codec: str
    comment: str | None


def _read_error(path: Path, why: str) -> OutputFolderError:
    return OutputFolderError(f"Could not read the video {path}: {why}; check the outputs folder or generate it again.")


def _ffmetadata_tag(text: str, key: str) -> str | None:
    """A global tag from ffmpeg's ffmetadata output ("key=value"; '\\' escapes = ; # \\ and newlines).

    Read this way because `ffmpeg -i` cuts tag values it prints at 255 characters.
    """
    lines: list[list[tuple[str, bool]]] = [[]]
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            lines[-1].append((next(chars, ""), True))
        elif ch == "\n":
            lines.append([])
        else:
            lines[-1].append((ch, False))
    for line in lines:
        if not line or (line[0] == (";", False)) or (line[0] == ("#", False)):
            continue
        if line[0] == ("[", False):
            break  # [STREAM] / [CHAPTER] sections follow the global tags
        cut = next((i for i, c in enumerate(line) if c == ("=", False)), None)
        if cut is not None and "".join(c for c, _ in line[:cut]) == key:
            return "".join(c for c, _ in line[cut + 1 :])
    return None


def probe_video(path) -> VideoInfo:
    p = Path(path)
    if not p.is_file():
        raise _read_error(p, "the file does not exist")
    # stderr: the stream summary; stdout: the container tags, unabridged.
    _, header, tags = _run_ffmpeg(["-i", _url(p), "-f", "ffmetadata", "-"], capture_stdout=True)
    stream = next((ln for ln in header.splitlines() if re.search(r"Stream #\d+:\d+.*: Video: ", ln)), None)
    if stream is None:
        raise _read_error(p, "it holds no readable video stream")
    video_part = stream.split(": Video: ", 1)[1]
    codec = video_part.split()[0].rstrip(",")
    size = re.search(r",\s*(\d+)x(\d+)\b", video_part)  # ", 64x48" (not the "0x31637661" codec tag)
    fps_m = re.search(r"([\d.]+)(k?) fps", video_part) or re.search(r"([\d.]+)(k?) tbr", video_part)
    fps = float(fps_m.group(1)) * (1000 if fps_m.group(2) else 1) if fps_m else 0.0
    dur = re.search(r"Duration:\s*(\d+):(\d+):([\d.]+)", header)
    duration = int(dur.group(1)) * 3600 + int(dur.group(2)) * 60 + float(dur.group(3)) if dur else 0.0

    # Exact count: remux every packet to the null muxer (no decoding) and read its progress.
    rc, err, out = _run_ffmpeg(
        ["-v", "error", "-i", _url(p), "-map", "0:v:0", "-c", "copy", "-f", "null", "-progress", "pipe:1", "-nostats", "-"],
        capture_stdout=True,
    )
    counts = re.findall(r"frame=\s*(\d+)", out) or re.findall(r"frame=\s*(\d+)", err)
    if rc != 0 or not counts:
        raise _read_error(p, "ffmpeg could not read its frames")
    return VideoInfo(
        frames=int(counts[-1]),
        width=int(size.group(1)) if size else 0,
        height=int(size.group(2)) if size else 0,
        fps=fps,
        duration_s=duration,
        codec=codec,
        comment=_ffmetadata_tag(tags, "comment"),
    )


def read_frames(path) -> np.ndarray:
    """Decode every frame to a (T, H, W, 3) uint8 array (for tests and small files)."""
    import imageio_ffmpeg

    p = Path(path)
    if not p.is_file():
        raise _read_error(p, "the file does not exist")
    gen = imageio_ffmpeg.read_frames(str(p.absolute()), pix_fmt="rgb24")
    try:
        meta = next(gen)
        width, height = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in gen]
    except (RuntimeError, OSError, StopIteration) as exc:
        raise _read_error(p, f"ffmpeg could not decode it ({one_line(str(exc))})") from exc
    finally:
        gen.close()
    if not frames:
        return np.zeros((0, height, width, 3), np.uint8)
    return np.stack(frames)


def iter_frames(path) -> Iterator[np.ndarray]:
    """Decode frames one at a time as (H, W, 3) uint8 (a long video never sits in RAM whole)."""
    import imageio_ffmpeg

    p = Path(path)
    if not p.is_file():
        raise _read_error(p, "the file does not exist")
    gen = imageio_ffmpeg.read_frames(str(p.absolute()), pix_fmt="rgb24")
    try:
        meta = next(gen)
        width, height = meta["size"]
        for buf in gen:
            yield np.frombuffer(buf, np.uint8).reshape(height, width, 3)
    except (RuntimeError, OSError, StopIteration) as exc:
        raise _read_error(p, f"ffmpeg could not decode it ({one_line(str(exc))})") from exc
    finally:
        gen.close()
