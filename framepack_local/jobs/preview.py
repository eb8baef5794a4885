"""Which video the page gets after each section: the whole video so far, or only its latest minute.

Republishing the whole video after every section costs time proportional to its length, so a job of n
sections would copy O(n^2) frames in all (the 100th publish of a 120 s job took 0.2 s and grew
linearly). So: while the video is at most LATEST_SECONDS long, every publish is the whole of it (as
before); after that, most publishes are the latest minute only (constant cost), and the whole video
comes again whenever the job has grown by a quarter since the last whole one (and when it is stopped
or finishes). The whole publishes then sum to about five times the final length: linear in all.
"Latest" means the growing edge: the end in forward mode, the start in inverted mode.
"""

from __future__ import annotations

LATEST_SECONDS = 60.0
GROWTH_BEFORE_FULL = 0.25  # republish the whole video when the job grew by this share since the last


def preview_scope(sections_done: int, last_full: int, seconds_so_far: float) -> str:
    """Pure: "full" or "latest" for the publish after section `sections_done` (1-based count).

    last_full: the section count at the last whole publish (0 = none yet).
    """
    if seconds_so_far <= LATEST_SECONDS or last_full <= 0:
        return "full"
    if sections_done - last_full >= max(1, int(last_full * GROWTH_BEFORE_FULL)):
        return "full"
    return "latest"
