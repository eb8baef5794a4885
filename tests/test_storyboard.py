"""Storyboard: the pure section plan, bad input, and what the transformer actually receives per section."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from framepack_local.engine import schedule, storyboard
from framepack_local.engine.encode import vae_encode
from framepack_local.engine.generate import Engine
from framepack_local.errors import InputError
from framepack_local.images import cover_resize_crop
from framepack_local.jobs import store
from framepack_local.params import JobParams
from framepack_local.weights.model_folder import load_part


def expected(sections, window, has_end, prompt_bounds, keyframe_bounds):
    """An independent reading of the rules, per section in video order."""
    cuts = [0] + keyframe_bounds + [sections]
    out = []
    for v in range(sections):
        stretch = max(i for i in range(len(cuts) - 1) if cuts[i] <= v)
        first, stop = cuts[stretch], cuts[stretch + 1]
        is_stretch_end = v == stop - 1
        endpoint = None
        if is_stretch_end:
            endpoint = stretch + 1 if stretch + 1 < len(cuts) - 1 else (len(keyframe_bounds) + 1 if has_end else None)
        pads = schedule.latent_paddings(stop - first)  # sampling order within the stretch
        padding = pads[stop - 1 - v] * window
        prompt = max([0] + [i + 1 for i, b in enumerate(prompt_bounds) if b <= v],
                     key=lambda i: (0 if i == 0 else prompt_bounds[i - 1], i))
        out.append((stretch, endpoint, padding, prompt))
    return out


@pytest.mark.parametrize("window", [1, 2, 5, 9, 16, 33])
def test_section_plan_follows_the_rules_for_every_shape(window):
    step = storyboard.section_seconds(window)
    for sections, n_keys, n_prompts, has_end in itertools.product(range(1, 61), range(5), range(1, 7), (False, True)):
        keyframe_bounds = [round(sections * (i + 1) / (n_keys + 1)) for i in range(n_keys)]
        if len(set(keyframe_bounds)) < n_keys or any(b in (0, sections) for b in keyframe_bounds):
            continue  # not a valid keyframe layout for this length (refusals are tested below)
        if sections == 1 and n_prompts > 1:
            continue  # a one-section video has no later section for a timed prompt (refused, below)
        prompt_bounds = [1 + (i * 7) % max(1, sections - 1) for i in range(1, n_prompts)]
        plans = storyboard.plan_sections(sections, window, "inverted", has_end, [b * step for b in prompt_bounds],
                                         [b * step for b in keyframe_bounds])
        assert [p.number for p in plans] == list(range(sections))
        assert [p.video_index for p in plans] == list(reversed(range(sections)))  # inverted: the end first
        want = expected(sections, window, has_end, prompt_bounds, keyframe_bounds)
        for p in plans:
            stretch, endpoint, padding, prompt = want[p.video_index]
            assert (p.stretch, p.anchor, p.endpoint, p.layout.padding, p.prompt) == (
                stretch, stretch, endpoint, padding, prompt)
            assert p.layout.use_end_image == (endpoint is not None)
            assert p.layout.indices_latents[0] == 1 + padding and len(p.layout.indices_latents) == window
            stretch_end = stretch + 1 if stretch < n_keys else (n_keys + 1 if has_end else None)
            assert p.image_keyframes == ((stretch,) if stretch_end is None else (stretch, stretch_end))
        if n_keys == 0 and n_prompts == 1:  # no storyboard: exactly today's layout
            assert [p.layout for p in plans] == schedule.section_layouts(sections, window, "inverted", has_end)
        forward = storyboard.plan_sections(sections, window, "forward", False, [b * step for b in prompt_bounds])
        assert [p.layout for p in forward] == schedule.section_layouts(sections, window, "forward")
        assert [p.prompt for p in forward] == [row[3] for row in expected(sections, window, False, prompt_bounds, [])]


def test_times_snap_half_up_without_float_noise():
    # Exactly 1.2 s apart at window 9 (1.2 s sections): two boundaries, not one (round-half-even gave 2 and 2).
    assert [storyboard.boundary_of(t, 9) for t in (0.6, 1.8, 3.0, 4.2, 5.4)] == [1, 2, 3, 4, 5]
    plans = storyboard.plan_sections(8, 9, "inverted", False, keyframe_times=[1.8, 3.0])
    assert {p.stretch for p in plans} == {0, 1, 2}


def test_prompt_blending_moves_linearly_over_n_sections():
    step = storyboard.section_seconds(9)
    plans = sorted(storyboard.plan_sections(8, 9, "inverted", False, [2 * step, 6 * step], blend_sections=2),
                   key=lambda p: p.video_index)
    got = [(p.prompt, p.prompt_from, round(p.blend, 3)) for p in plans]
    assert got == [(0, None, 1.0), (0, None, 1.0), (1, 0, 0.333), (1, 0, 0.667), (1, None, 1.0), (1, None, 1.0),
                   (2, 1, 0.333), (2, 1, 0.667)]


@pytest.mark.parametrize("kwargs, words", [
    (dict(keyframe_times=[0.1]), "start photo"),
    (dict(keyframe_times=[4.8]), "end frame"),
    (dict(keyframe_times=[1.2, 1.4]), "same section boundary"),
    (dict(keyframe_times=[9.0]), "outside the 4.8 s video"),
    (dict(prompt_times=[-1.0]), "outside"),
    (dict(keyframe_times=[1.2], mode="forward"), "inverted anti-drift mode"),
    (dict(prompt_times=[0.7] * 65), "At most 64"),
    (dict(prompt_times=[0.5]), "lands on the video's start, where the main prompt applies"),
])
def test_bad_storyboards_are_refused_in_one_sentence(kwargs, words):
    args = dict(sections=4, window=9, mode="inverted", has_end_image=False)
    args.update(kwargs)
    with pytest.raises(InputError) as info:
        storyboard.plan_sections(**args)
    assert words in str(info.value) and "\n" not in str(info.value)


class Recorder:
    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, _args, kwargs):
        self.calls.append({k: kwargs[k].detach().clone() for k in ("latents_clean", "encoder_hidden_states",
                                                                  "image_embeds")})


def photo_file(path, seed, size=(80, 64)):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_the_transformer_sees_the_keyframes_and_prompts_the_plan_says(tiny_model_dir, photo, end_photo, tmp_path):
    engine = Engine(device="cpu")
    key = photo_file(tmp_path / "key.png", 11)
    steps = 2
    base = dict(image=str(photo), end_image=str(end_photo), seconds=1.6, window=2, steps=steps, resolution=64,
                seed=3, models=str(tiny_model_dir), cache="off")
    step = storyboard.section_seconds(2)  # 0.267 s: 6 sections
    params = JobParams(**base, prompt="calm sea", timed_prompts=((3 * step, "a storm rises"),),
                       keyframes=((2 * step, str(key)),), outputs=str(tmp_path / "story"))
    transformer = engine.loaded_models(params).transformers["inverted"]
    rec = Recorder(transformer)
    try:
        result = engine.generate(params)
        calls = list(rec.calls)
        rec.calls.clear()
        engine.generate(JobParams(**base, prompt="a storm rises", outputs=str(tmp_path / "storm")))
        storm_calls = list(rec.calls)
    finally:
        rec.handle.remove()
    record = store.read_record(result.job_dir)
    assert record["storyboard"]["keyframes"][0]["file"] == "keyframe_01.png"
    assert [p["prompt"] for p in record["storyboard"]["prompts"]] == ["calm sea", "a storm rises"]

    # The keyframes' latents, encoded independently from the saved (cropped) images.
    vae = load_part(tiny_model_dir, "vae", "cpu", torch.float32)
    rgb = lambda name: np.asarray(Image.open(result.job_dir / name).convert("RGB"))  # noqa: E731
    latents = [vae_encode(vae, rgb(n), "cpu") for n in ("input.png", "keyframe_01.png", "end_input.png")]
    h, w = rgb("input.png").shape[:2]
    assert np.array_equal(rgb("keyframe_01.png"), cover_resize_crop(Image.open(key), h, w))

    plans = engine.section_plan(params, True)
    assert len(calls) == len(plans) * steps
    for plan in plans:
        first = calls[plan.number * steps]
        assert torch.equal(first["latents_clean"][:, :, :1], latents[plan.anchor].to(first["latents_clean"].dtype))
        if plan.endpoint is not None:  # the endpoint keyframe in the 1x slot
            assert torch.equal(first["latents_clean"][:, :, 1:2], latents[plan.endpoint])
        # Text: exactly the embeddings a one-prompt job with that prompt receives.
        if plan.prompt == 1:
            assert torch.equal(first["encoder_hidden_states"], storm_calls[0]["encoder_hidden_states"])
        else:
            assert not torch.equal(first["encoder_hidden_states"], storm_calls[0]["encoder_hidden_states"])
    stretches = {p.stretch for p in plans}
    assert stretches == {0, 1} and {p.endpoint for p in plans} == {1, 2, None}
    # Stretch 1 (keyframe -> end frame) and stretch 0 (photo -> keyframe) blend different image pairs.
    by_stretch = {p.stretch: calls[p.number * steps]["image_embeds"] for p in plans}
    assert not torch.equal(by_stretch[0], by_stretch[1])
    assert storm_calls[0]["image_embeds"].shape == by_stretch[0].shape


def test_cli_storyboard_file_and_flags_kill_and_resume_bit_identical(tiny_model_dir, photo, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from framepack_local.jobs.video import probe_video

    repo = Path(__file__).resolve().parent.parent
    key = photo_file(tmp_path / "key.png", 5)
    step = storyboard.section_seconds(2)
    story = tmp_path / "story.json"
    story.write_text(json.dumps({"prompts": [{"at": 0, "prompt": "a quiet harbour"},
                                             {"at": round(2 * step, 3), "prompt": "boats leave"}],
                                 "keyframes": [{"at": round(3 * step, 3), "image": "key.png"}]}))
    args = ["generate", "--image", str(photo), "--storyboard", str(story), "--prompt-at", str(round(4 * step, 3)),
            "night falls", "--prompt-blend", "1", "--seconds", "1.6", "--window", "2", "--steps", "6",
            "--resolution", "64", "--seed", "4", "--models", str(tiny_model_dir)]
    cmd = [sys.executable, "-m", "framepack_local", *args]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--outputs", str(killed)], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, job_dir = time.monotonic() + 120, None
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = [p for p in killed.iterdir() if p.is_dir()] if killed.is_dir() else []
        if dirs:
            job_dir = dirs[0]
            try:
                if store.read_record(job_dir).get("sections_done", 0) >= 2:
                    break
            except (OSError, ValueError):
                pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    record = store.read_record(job_dir)
    assert 2 <= record["sections_done"] < record["sections"] == 6
    store.recover_interrupted(killed)
    resumed = subprocess.run([sys.executable, "-m", "framepack_local", "resume", str(job_dir)], cwd=repo,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    params = JobParams(image=str(photo), prompt="a quiet harbour", seconds=1.6, window=2, steps=6, resolution=64,
                       seed=4, models=str(tiny_model_dir), outputs=str(tmp_path / "clean"), prompt_blend=1,
                       timed_prompts=((round(2 * step, 3), "boats leave"), (round(4 * step, 3), "night falls")),
                       keyframes=((round(3 * step, 3), str(key)),))
    clean = Engine(device="cpu").generate(params)
    assert torch.equal(store.job_latents(job_dir, "inverted"), store.job_latents(clean.job_dir, "inverted"))
    final = store.read_record(job_dir)
    assert [p["prompt"] for p in final["storyboard"]["prompts"]] == ["a quiet harbour", "boats leave", "night falls"]
    info = probe_video(job_dir / store.FINAL_VIDEO)
    assert info.frames == final["frames"] == schedule.total_frames(6, 2)  # keyframes add no frames
    meta = json.loads(info.comment)["framepack_local"]
    assert meta["keyframes"] == [[round(3 * step, 3), str(key)]] and meta["prompt_blend"] == 1
    assert [t for t, _ in meta["timed_prompts"]] == [round(2 * step, 3), round(4 * step, 3)]


def test_storyboard_file_errors_are_one_sentence(tmp_path):
    bad = tmp_path / "bad.json"
    for text, words in (("{not json", "not valid JSON"), ('{"prompts": [], "music": 1}', "unknown keys"),
                        ('{"prompts": [{"at": 1}]}', "needs exactly"), ('{"keyframes": [{"at": "x", "image": "a"}]}',
                                                                         "time in seconds")):
        bad.write_text(text)
        with pytest.raises(InputError) as info:
            storyboard.load_file(bad)
        assert words in str(info.value) and "\n" not in str(info.value)


def test_page_rows_become_the_storyboard_and_reuse_restores_them(photo, tmp_path):
    from framepack_local.ui import forms
    from framepack_local.ui.story import STORY_FIELDS, plan_preview_html

    rows = {name: None for name in STORY_FIELDS}
    rows.update(story_at_1=2.4, story_prompt_1=" a storm rises ", story_at_2=3.6, story_image_2=str(photo),
                story_at_3=1.2)  # a time alone is an empty row
    base = dict(image=str(photo), prompt="calm", seconds=10, seed=1, steps=4, window=9, mode="inverted",
                prompt_blend=1, **rows)
    params = forms.form_to_params(base, tmp_path, tmp_path)
    assert params.timed_prompts == ((2.4, "a storm rises"),) and params.keyframes == ((3.6, str(photo)),)
    assert params.prompt_blend == 1

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "keyframe_01.png").write_bytes(photo.read_bytes())
    back = forms.params_to_form(params.to_dict(), job_dir)
    assert (back["story_at_1"], back["story_prompt_1"], back["story_image_1"]) == (2.4, "a storm rises", None)
    assert (back["story_at_2"], back["story_image_2"]) == (3.6, str(job_dir / "keyframe_01.png"))
    assert back["story_rows"] == 2 and back["story_dropped"] == 0 and back["prompt_blend"] == 1

    preview = plan_preview_html(10, 9, "inverted", False, "calm", 1, rows)
    assert 'data-sections="8"' in preview and "key@3.6s" in preview and "a storm rises" in preview
    bad = dict(rows, story_at_2=0.1)
    assert "lands on the video&#x27;s start" in plan_preview_html(10, 9, "inverted", False, "calm", 0, bad)
    for changes, words in ((dict(story_at_1=None), "Give storyboard row 1 a time"),
                           (dict(story_at_1=0), "row 1 is at 0 s"),
                           (dict(story_at_1="soon"), "must be a number")):
        with pytest.raises(InputError, match=words):
            forms.form_to_params({**base, **changes}, tmp_path, tmp_path)


def test_unreadable_keyframe_is_refused_before_any_file(tiny_model_dir, photo, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    params = JobParams(image=str(photo), seconds=1.6, window=2, steps=1, resolution=64, models=str(tiny_model_dir),
                       outputs=str(tmp_path / "out"), keyframes=((0.6, str(broken)),))
    with pytest.raises(InputError, match="keyframe image at 0.6 s"):
        Engine(device="cpu").generate(params)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_command_line_flags_win_over_the_storyboard_file(photo, tmp_path, capsys):
    import json

    from framepack_local.__main__ import main

    story = tmp_path / "story.json"
    story.write_text(json.dumps({"prompts": [{"at": 0, "prompt": "from the file"}, {"at": 2.4, "prompt": "later"}],
                                 "blend_sections": 2}))
    base = ["generate", "--image", str(photo), "--storyboard", str(story), "--seconds", "6", "--plan-only"]
    assert main(base) == 0
    table = capsys.readouterr().out
    assert "from the file" in table and "33% later" in table  # the file's blend over two sections
    assert main(base + ["--prompt", "from the flag", "--prompt-blend", "0"]) == 0
    table = capsys.readouterr().out
    assert "from the flag" in table and "from the file" not in table and "%" not in table
    # job.json's storyboard record (keyframes carry "file") reads back as a storyboard file.
    story.write_text(json.dumps({"prompts": [], "keyframes": [{"at": 2.4, "image": "k.png", "file": "keyframe_01.png"}],
                                 "blend_sections": 0}))
    assert storyboard.load_file(story)["keyframes"] == [(2.4, str(tmp_path / "k.png"))]
