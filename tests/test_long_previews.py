"""Long jobs: the video so far is the latest minute once the video passes a minute, the whole video on a
geometric schedule, after a stop and at the end (jobs/preview.py)."""

from __future__ import annotations

from framepack_local.engine import schedule
from framepack_local.engine.generate import Engine
from framepack_local.events import CancelToken, Notice, SectionFinished
from framepack_local.jobs import store
from framepack_local.jobs.preview import LATEST_SECONDS, preview_scope
from framepack_local.jobs.video import probe_video
from framepack_local.params import JobParams


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


def test_a_job_past_a_minute_shows_its_latest_minute_and_a_stop_keeps_the_whole(tiny_model_dir, photo, tmp_path):
    engine = Engine(device="cpu")
    params = JobParams(image=str(photo), prompt="a long road", seconds=70.0, window=9, steps=1, resolution=64,
                       models=str(tiny_model_dir), outputs=str(tmp_path / "out"), cache="off")  # 58 sections
    cancel, finished, notices = CancelToken(), [], []

    def on_event(event):
        if isinstance(event, SectionFinished):
            finished.append((event.section, event.frames, probe_video(event.video_path).frames))
            if event.section == 55:
                cancel.cancel()
        elif isinstance(event, Notice):
            notices.append(event.message)

    result = engine.generate(params, on_event=on_event, cancel=cancel)
    assert result.status == "stopped"
    latest = int(LATEST_SECONDS * schedule.FPS)
    sizes = {section: (frames, in_file) for section, frames, in_file in finished}
    assert all(frames == in_file for frames, in_file in sizes.values())  # the event names the file's frames
    assert sizes[50][0] > sizes[49][0]  # still the whole video at 60 s
    assert latest <= sizes[52][0] < sizes[51][0] + 36  # then the latest minute (whole segments at the edge)
    assert any("latest 60 s" in n for n in notices)
    record = store.read_record(result.job_dir)
    whole = probe_video(result.video_path).frames
    assert record["sections_done"] == 55 and whole > sizes[55][0]  # the stop republished the whole video
    assert whole == sum(s["frames"] for s in record["video"]["segments"]) + (
        record["video"]["pending"]["frames"] if record["video"]["pending"] else 0)
