"""Wall time of the engine against diffusers' HunyuanVideoFramepackPipeline on the same tiny model.

Both get the same photo, prompt, length, window, steps, seed and Euler flow sampling; both end with
an mp4 on disk (diffusers: its output frames through diffusers.utils.export_to_video). Models are
loaded once before timing. Runs alternate between the two to spread machine noise; medians are
reported.

    python benchmarks/bench_engine_vs_diffusers.py [--seconds 3] [--steps 4] [--resolution 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline  # noqa: E402
from diffusers.utils import export_to_video  # noqa: E402

from framepack_local.engine import schedule  # noqa: E402
from framepack_local.images import cover_resize_crop, load_image  # noqa: E402
from framepack_local.params import JobParams  # noqa: E402
from framepack_local.engine.generate import Engine  # noqa: E402
from framepack_local.weights.tiny import make_tiny_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=9)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fpl-bench-"))
    models_dir = make_tiny_model(work / "tiny")
    rng = np.random.default_rng(0)
    photo = work / "photo.png"
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(photo)

    engine = Engine(device="cpu")
    params = JobParams(image=str(photo), prompt="a calm lake at dawn", seconds=args.seconds, window=args.window,
                       steps=args.steps, resolution=args.resolution, sampler="euler", models=str(models_dir),
                       outputs=str(work / "out"), seed=1)
    models = engine.loaded_models(params)

    image = load_image(photo)
    height, width = schedule.find_bucket(image.height, image.width, args.resolution)
    crop = Image.fromarray(cover_resize_crop(image, height, width))
    sections = schedule.section_count(args.seconds, args.window)
    pipe = HunyuanVideoFramepackPipeline(
        text_encoder=models.text_encoder, tokenizer=models.tokenizer, transformer=models.transformers["inverted"],
        vae=models.vae, text_encoder_2=models.text_encoder_2, tokenizer_2=models.tokenizer_2,
        image_encoder=models.image_encoder, feature_extractor=models.feature_extractor,
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
    )
    pipe.set_progress_bar_config(disable=True)
    models.vae.use_framewise_decoding = False  # same VAE setting for both (the engine sets this on CPU)

    def run_engine() -> float:
        t = time.perf_counter()
        engine.generate(params)
        return time.perf_counter() - t

    def run_engine_unipc() -> float:
        t = time.perf_counter()
        engine.generate(params.replace(sampler="unipc"))
        return time.perf_counter() - t

    def run_diffusers() -> float:
        t = time.perf_counter()
        frames = pipe(image=crop, prompt=params.prompt, height=height, width=width,
                      num_frames=sections * ((args.window - 1) * 4 + 1), latent_window_size=args.window,
                      num_inference_steps=args.steps, guidance_scale=params.distilled_cfg,
                      generator=torch.Generator("cpu").manual_seed(1), output_type="np",
                      sampling_type="inverted_anti_drifting").frames[0]
        export_to_video(list(frames), str(work / "diffusers.mp4"), fps=30)
        return time.perf_counter() - t

    run_engine(), run_diffusers()  # warm-up: first calls pay one-off allocator and import costs
    times = {"engine (euler)": [], "engine (unipc)": [], "diffusers pipeline": []}
    for _ in range(args.repeats):
        times["engine (euler)"].append(run_engine())
        times["diffusers pipeline"].append(run_diffusers())
        times["engine (unipc)"].append(run_engine_unipc())

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tiny model, {sections} sections x {args.steps} steps, window {args.window}, "
          f"{width}x{height}, {schedule.total_frames(sections, args.window)} frames, {args.repeats} repeats")
    print(f"{'run':22s} {'median s':>9s}  all")
    for k, v in times.items():
        print(f"{k:22s} {med[k]:9.2f}  {', '.join(f'{x:.2f}' for x in v)}")
    print(f"ratio engine(euler)/diffusers = {med['engine (euler)'] / med['diffusers pipeline']:.2f}")
    print(f"ratio engine(unipc)/diffusers = {med['engine (unipc)'] / med['diffusers pipeline']:.2f}")


if __name__ == "__main__":
    main()
