"""Sampling speed: plain diffusers `StableDiffusionPipeline` vs `conceptkit generate` (issue 21), images/s at 30 steps.

Variants, each generating the same images (2 prompts x `--images` seeds, DDIM η=0, guidance 7.5, 64 px on the
bundled model, one batch), interleaved round by round in one process on `--threads` threads:

- `diffusers`: the vanilla pipeline, `StableDiffusionPipeline.from_pretrained(bundled, torch_dtype=float32)` with
  a DDIM scheduler, called as a user calls it (one generator per image);
- `conceptkit`: `generate(pipe, ...)`, the defaults;
- `conceptkit --bf16`: the UNet under bf16 autocast (generate/autocast.py; only on CPUs with native bf16);
- `conceptkit --compile` (with `--compile`): torch.compile of the UNet; its warm-up (the first call, compiling) is
  timed once and reported apart, the rounds run compiled; and `--bf16 --compile` together (the compiled UNet under
  bf16 autocast; its own warm-up is in its untimed first call).

Per variant: median process CPU time (time.process_time) and wall time per image over the rounds, the wall spread,
images/s, the ratio of diffusers' CPU time to the variant's, and the max pixel difference (of 255) to diffusers'
images and to conceptkit's default images.

    python benchmarks/generate_speed.py --threads 1 --rounds 3 [--compile]

On a machine shared with other work, wall times are contended (the table's last line prints the load average);
CPU times are the steadier figure. Never a test: tests assert no timings.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

PROMPTS = ["a large red striped circle in the center, on a navy background",
           "a small yellow dotted square on the left, on a teal background"]


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(i) for i in images]).astype(np.int16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=2, help="seeds per prompt (2 prompts)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="also time --compile (minutes of warm-up on a CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from conceptkit.generate.autocast import cpu_has_bf16
    from conceptkit.generate.images import generate
    from conceptkit.models.loading import bundled_model_path, load_pipeline

    pipe = load_pipeline("toy", device="cpu")
    vanilla = StableDiffusionPipeline.from_pretrained(bundled_model_path(), torch_dtype=torch.float32,
                                                      safety_checker=None, requires_safety_checker=False)
    vanilla.scheduler = DDIMScheduler.from_config(vanilla.scheduler.config)
    vanilla.set_progress_bar_config(disable=True)
    jobs = [(p, j) for p in PROMPTS for j in range(args.images)]

    def run_vanilla():
        gens = [torch.Generator().manual_seed(s) for _, s in jobs]
        return vanilla([p for p, _ in jobs], num_inference_steps=args.steps, guidance_scale=7.5, eta=0.0,
                       generator=gens, height=64, width=64).images

    def run_ours(**speed):
        return generate(pipe, PROMPTS, num_images=args.images, steps=args.steps, progress=False, **speed).images

    variants = {"diffusers StableDiffusionPipeline": run_vanilla, "conceptkit generate": run_ours}
    if cpu_has_bf16():
        variants["conceptkit generate --bf16"] = lambda: run_ours(bf16=True)
    warmup = None
    if args.compile:
        variants["conceptkit generate --compile"] = lambda: run_ours(compile=True)
        if cpu_has_bf16():
            variants["conceptkit generate --bf16 --compile"] = lambda: run_ours(bf16=True, compile=True)
        began = time.perf_counter()
        run_ours(compile=True)
        warmup = time.perf_counter() - began

    for fn in variants.values():  # one untimed call each (allocator, caches)
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    images: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            c, w = time.process_time(), time.perf_counter()
            out = fn()
            times[name].append(((time.process_time() - c) / len(jobs), (time.perf_counter() - w) / len(jobs)))
            images[name] = pixels(out)

    base_cpu = statistics.median(c for c, _ in times["diffusers StableDiffusionPipeline"])
    ours = images["conceptkit generate"]
    print(f"{len(jobs)} images of 64 px per call, {args.steps} DDIM steps, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds (medians)\n")
    print("| variant | CPU s/image | wall s/image (min-max) | images/s (wall) | speed-up vs diffusers (CPU) | "
          "max pixel diff vs diffusers | vs conceptkit default |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in times.items():
        cpu, wall = statistics.median(c for c, _ in runs), statistics.median(w for _, w in runs)
        walls = [w for _, w in runs]
        d_vanilla = int(np.abs(images[name] - images["diffusers StableDiffusionPipeline"]).max())
        d_ours = int(np.abs(images[name] - ours).max())
        print(f"| {name} | {cpu:.3f} | {wall:.3f} ({min(walls):.3f}-{max(walls):.3f}) | {1 / wall:.2f} | "
              f"{base_cpu / cpu:.2f}x | {d_vanilla} | {d_ours} |")
    if warmup is not None:
        print(f"\n--compile warm-up (first call, compiling): {warmup:.0f} s wall")
    print(f"\nload average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
          f"{' (contended: other work was running)' if os.getloadavg()[0] > args.threads + 0.5 else ''}")


if __name__ == "__main__":
    main()
