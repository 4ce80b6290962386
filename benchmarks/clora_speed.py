"""CLoRA speed: conceptkit's batched `clora` vs. a reference with the official code's structure (2 and 4 LoRAs).

`clora` is `CLoRAConfig()`: one UNet call per step for all branches and both CFG halves (per-row adapters),
explicit attention only in the layers whose maps are used, no autograd graph on steps without a latent update.
`clora, whole UNet in the updates` is the same with `stop_after_maps=False` (each latent update's forward runs
the UNet to the end, as before; the images are the same bit for bit, tests/test_clora.py).
`reference` is `CLoRAConfig.reference()` with the same schedule: one UNet call per branch with PEFT adapter
switching, graphs on every step, explicit attention in every layer, stale predictions, maps over both CFG halves.
Both sample the same seeds with the same random LoRAs (PEFT `init_lora_weights=False`, UNet and text encoder);
the timed span is a whole image (text encoding, the denoising loop with its latent updates, VAE decode), after one
untimed warm-up image.

Each variant runs in its own child process (so peak memory is its own): `python benchmarks/clora_speed.py`.
`--sd15 --device cuda` times 512x512 images on a random-weight model of SD 1.5's sizes instead
(`conceptkit.models.fixtures.build_sd15_width`: UNet, text encoder and VAE).
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TRIGGERS = ["zwx", "qrv", "pkt", "jmh"]
CLASSES = {"toy": ["circle", "square", "triangle", "diamond"], "sd": ["cat", "dog", "bird", "horse"]}
TEMPLATES = {
    ("toy", 2): "a {a} and a {b}, on a gray background",
    ("toy", 4): "a {a} and a {b} and a {c} and a {d}",
    ("sd", 2): "a {a} and a {b} on the grass",
    ("sd", 4): "a {a} and a {b} and a {c} and a {d} on the grass",
}
WARM_UP_SEED = 1234


def add_random_lora(pipe, name: str, seed: int) -> None:
    """A LoRA with non-zero random up and down weights, on the UNet and the text encoder (as tests/test_clora.py)."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False),
                          adapter_name=name)
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TEXT_TARGETS,
                                             init_lora_weights=False), adapter_name=name)


def run_variant(variant: str, model: str, path: str, loras: int, steps: int, images: int, threads: int,
                device: str, schedule: dict, queue) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # one per added LoRA, expected
    from conceptkit.compose.config import CLoRAConfig
    from conceptkit.compose.prompts import ConceptSlot, branch_prompts
    from conceptkit.compose.sampler import method_branches, sample
    from conceptkit.generate.loop import decode
    from conceptkit.models.loading import load_pipeline

    pipe = load_pipeline(path, device=device)
    names = "abcd"[:loras]
    for i, name in enumerate(names):
        add_random_lora(pipe, name, 100 + i)
    kind = "toy" if model == "toy" else "sd"
    slots = [ConceptSlot(name, TRIGGERS[i], CLASSES[kind][i]) for i, name in enumerate(names)]
    bp = branch_prompts(pipe.tokenizer, TEMPLATES[(kind, loras)], slots)
    cfg = CLoRAConfig(steps=steps, **schedule)  # the schedule (steps, guidance, step size, iterative steps) is the same in both
    if variant == "reference":
        cfg = cfg.as_reference()
    elif variant == "clora-whole":  # the update's forward runs the whole UNet (before stop_after_maps)
        cfg = dataclasses.replace(cfg, stop_after_maps=False)
    sets, updates, masks, switch_every = method_branches("clora", bp, list(names), cfg)

    def one_image(seed: int) -> tuple[float, int]:
        began = time.perf_counter()
        r = sample(pipe, sets, cfg, groups=bp.groups if updates else None,
                   mask_indices=bp.mask_indices if masks else None,
                   generator=torch.Generator(device="cpu").manual_seed(seed), switch_every=switch_every)
        decode(pipe, r.latents)  # to a PIL image: waits for the device
        return time.perf_counter() - began, r.unet_calls

    one_image(WARM_UP_SEED)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds, calls = 0.0, 0
    for seed in range(images):
        s, calls = one_image(seed)
        seconds += s
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    queue.put({"seconds_per_image": seconds / images, "unet_calls": calls, "peak_rss_mb": peak / 1024,
               "peak_gpu_mb": gpu})


def measure(variant: str, model: str, path: str, loras: int, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=run_variant, args=(variant, model, path, loras, args.steps, args.images, args.threads,
                                                  args.device, schedule(args), queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def schedule(args) -> dict:
    out = {}
    if args.iterative_steps is not None:
        out["iterative_steps"] = tuple(int(v) for v in args.iterative_steps.split(",") if v.strip())
    if args.iterative_steps_steps is not None:
        out["iterative_steps_steps"] = args.iterative_steps_steps
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=2, help="timed images per variant (after one warm-up image)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterative-steps", help="comma-separated (default: CLoRAConfig's 0,10,20)")
    parser.add_argument("--iterative-steps-steps", type=int, help="refinements at those steps (default 20)")
    parser.add_argument("--models", default="toy,sd-fixture", help="toy, sd-fixture, or paths")
    parser.add_argument("--loras", default="2,4", help="numbers of LoRAs composed (at most 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sd15", action="store_true",
                        help="only: SD 1.5-sized random model, 512x512, 2 LoRAs (use with --device cuda)")
    args = parser.parse_args(argv)

    from conceptkit.models.fixtures import build_sd15_width, build_tiny_sd

    models = ["sd15-width"] if args.sd15 else args.models.split(",")
    counts = [2] if args.sd15 else [int(n) for n in args.loras.split(",")]
    if any(not 1 <= n <= 4 for n in counts):
        parser.error("--loras: each number must be 1 to 4")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fixture = None
        for model in models:
            if model == "sd-fixture":
                fixture = fixture or str(build_tiny_sd(Path(tmp) / "sd", seed=0))
                path = fixture
            elif model == "sd15-width":
                path = str(build_sd15_width(Path(tmp) / "sd15", seed=0))
            else:
                path = model
            for n in counts:
                ref = measure("reference", model, path, n, args)
                whole = measure("clora-whole", model, path, n, args)
                ours = measure("clora", model, path, n, args)
                rows.append((model, n, ref, whole, ours))
                print(f"{model}, {n} LoRAs: done", file=sys.stderr)
    gpu = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if gpu else f"{args.threads} CPU thread(s)"
    print(f"CLoRA, {args.steps} steps, {args.images} timed image(s) per row after a warm-up, {where}, "
          f"torch {torch.__version__}\n")
    print("| model | LoRAs | variant | s/image | UNet calls/image | peak RSS MB |"
          + (" peak GPU MB |" if gpu else "") + " speed-up |")
    print("|---|---|---|---|---|---|" + ("---|" if gpu else "") + "---|")
    for model, n, ref, whole, ours in rows:
        for name, r in (("reference", ref), ("clora, whole UNet in the updates", whole), ("clora", ours)):
            speed = f"{ref['seconds_per_image'] / r['seconds_per_image']:.2f}x"
            print(f"| {model} | {n} | {name} | {r['seconds_per_image']:.3f} | {r['unet_calls']} | "
                  f"{r['peak_rss_mb']:.0f} |" + (f" {r['peak_gpu_mb']:.0f} |" if gpu else "") + f" {speed} |")


if __name__ == "__main__":
    main()
