"""Long jobs: the video so far is the latest minute once the video passes a minute, the whole video on a
geometric schedule, after a stop and at the end (jobs/preview.py); time and memory stay flat."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from framepack_local.engine import schedule
from framepack_local.jobs import store
from framepack_local.jobs.preview import LATEST_SECONDS, preview_scope
from framepack_local.jobs.video import probe_video

REPO = Path(__file__).resolve().parents[1]
DONE_RE = re.compile(r"section (\d+)/\d+ done: (\S+) \((\d+) frames\) in ([\d.]+) s \(.* RAM (\d+) MB, peak (\d+) MB\)")


def test_the_whole_video_is_republished_on_a_geometric_schedule():
    step = 1.2  # seconds per section at window 9
    last_full, fulls = 0, []
    for done in range(1, 1801):
        if preview_scope(done, last_full, done * step) == "full":
            fulls.append(done)
            last_full = done
    assert fulls[:50] == list(range(1, 51))  # up to a minute of video: the whole of it, every time
    assert 51 not in fulls and 62 in fulls  # then when it has grown by a quarter
    copied = sum(fulls[50:])  # sections copied by the whole publishes after the first minute
    assert copied <= 6 * 1800 and len(fulls) < 50 + 25  # linear in the length, not quadratic
    assert preview_scope(10, 9, 30.0) == "full" and preview_scope(100, 90, 120.0) == "latest"


def test_a_58_section_cli_job_stays_flat_and_a_stop_keeps_the_whole_video(tiny_model_dir, photo, tmp_path):
    """70 s at window 9 = 58 sections through the command line; Ctrl+C after section 55."""
    # (The preview schedule's numbers: a minute is 50 sections at window 9.)
    proc = subprocess.Popen(
        [sys.executable, "-m", "framepack_local", "generate", "--image", str(photo), "--prompt", "a long road",
         "--seconds", "70", "--window", "9", "--steps", "1", "--resolution", "64", "--cache", "off",
         "--models", str(tiny_model_dir), "--outputs", str(tmp_path / "out")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows, log = {}, []
    for line in proc.stdout:
        log.append(line)
        if m := DONE_RE.search(line):
            n = int(m.group(1))
            rows[n] = {"s": float(m.group(4)), "rss": int(m.group(5)), "peak": int(m.group(6)),
                       "frames": int(m.group(3)), "file": m.group(2)}
            if n == 55:
                proc.send_signal(signal.SIGINT)  # Ctrl+C: stop after the current step, keep the video
    assert proc.wait(timeout=60) == 1, "".join(log[-20:])
    stopped_at = max(rows)  # 55, or 56 when the signal came during that section's only step
    assert sorted(rows) == list(range(1, stopped_at + 1)) and stopped_at in (55, 56)

    # Time per section is flat: the last ten no slower than the first ten after the start-up one.
    first = sum(rows[n]["s"] for n in range(2, 12)) / 10
    last = sum(rows[n]["s"] for n in range(46, 56)) / 10
    assert last <= 1.5 * first, (first, last)
    # Memory is flat: from section 10 to 55 the peak grows by less than keeping each section's decoded
    # float32 frames would add (64x48 px, 36 frames: 1.3 MB a section, 59 MB over these 45 sections);
    # allocator noise measured here stays under 20 MB.
    assert rows[55]["peak"] - rows[10]["peak"] < 45, [(n, rows[n]["peak"], rows[n]["rss"]) for n in (10, 30, 55)]

    latest = int(LATEST_SECONDS * schedule.FPS)
    assert rows[50]["frames"] > rows[49]["frames"]  # still the whole video at 60 s
    assert latest <= rows[52]["frames"] < rows[51]["frames"] + 36  # then the latest minute (whole segments)
    assert any("latest 60 s" in line for line in log)
    job_dir = Path(rows[55]["file"]).parent
    record = store.read_record(job_dir)
    video = job_dir / store.PARTIAL_VIDEO
    whole = probe_video(video).frames
    assert record["status"] == "stopped" and record["sections_done"] == stopped_at
    assert whole > rows[stopped_at]["frames"]  # the stop republished the whole video
    assert whole == sum(s["frames"] for s in record["video"]["segments"]) + (
        record["video"]["pending"]["frames"] if record["video"]["pending"] else 0)
