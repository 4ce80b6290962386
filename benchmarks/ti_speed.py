"""Textual Inversion speed: conceptkit's trainer vs. a reference loop shaped like diffusers' example script.

The reference does what `examples/textual_inversion/textual_inversion.py` does every step: encode the batch with
the VAE, run the text encoder with the *whole* token-embedding matrix trainable (AdamW over all its rows), then copy
the frozen rows back. conceptkit encodes each image (and its mirror) once, trains only the new vectors, and keeps
the frozen models out of autograd. Both draw identical randomness (images, flips, VAE sampling noise, diffusion
noise, timesteps, templates), so their loss trajectories must agree; the table reports the largest difference,
next to the same conceptkit loop run on another thread count (float summation order alone; on a random-weight
model Adam's per-element normalisation amplifies such last-bit differences).

Each variant runs in its own child process (so peak memory is its own): `python benchmarks/ti_speed.py`.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def reference_loop(pipe, images: torch.Tensor, cfg, steps: int) -> tuple[list[float], float]:
    """diffusers' example, reduced to its per-step work (same draws as conceptkit's `draw_batch`).

    Returns the losses and the seconds spent in the step loop."""
    from diffusers import DDPMScheduler

    from conceptkit.learn.templates import load_templates
    from conceptkit.learn.loop import step_generator
    from conceptkit.learn.textual_inversion import placeholder_tokens

    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    names = placeholder_tokens(cfg.token, cfg.vectors)
    tokenizer.add_tokens(names)
    init_id = tokenizer(cfg.init_word, add_special_tokens=False).input_ids[0]
    ids = tokenizer.convert_tokens_to_ids(names)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = table[init_id].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    table.requires_grad_(True)
    text_encoder.train()
    optimizer = torch.optim.AdamW([table], lr=cfg.effective_lr, weight_decay=cfg.weight_decay)
    original = table.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[min(ids): max(ids) + 1] = False
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    templates = load_templates(cfg.template)
    placeholder = " ".join(names)
    losses = []
    began = time.perf_counter()
    for step in range(steps):
        g = step_generator(cfg.seed, step)
        index = torch.randint(0, len(images), (cfg.batch,), generator=g)
        flipped = torch.rand(cfg.batch, generator=g) < cfg.flip_p
        pixels = torch.where(flipped[:, None, None, None], images[index].flip(-1), images[index])
        dist = vae.encode(pixels).latent_dist  # every step, as the example does
        sample = torch.randn(dist.mean.shape, generator=g)
        latents = (dist.mean + dist.std * sample) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=g)
        template_ids = torch.randint(0, len(templates), (cfg.batch,), generator=g)
        captions = [templates[i].format(placeholder) for i in template_ids]
        input_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids
        cond = text_encoder(input_ids)[0]
        pred = unet(scheduler.add_noise(latents, noise, t), t, cond).sample
        target = scheduler.get_velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" \
            else noise
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            table[keep] = original[keep]
        losses.append(loss.item())
    return losses, time.perf_counter() - began


def run_variant(variant: str, model: str, images_dir: str, batch: int, steps: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    from conceptkit.learn.images import load_images
    from conceptkit.learn.textual_inversion import learn_textual_inversion
    from conceptkit.learn.ti_config import TIConfig
    from conceptkit.models.loading import load_pipeline

    pipe = load_pipeline(model)
    cfg = TIConfig(token="<bench>", steps=steps, batch=batch, checkpoint_every=10**9, validation_prompts=())
    # Timed: the step loop only (set-up such as caching latents or resizing the table is paid once per run).
    if variant == "reference":
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        losses, seconds = reference_loop(pipe, load_images(images_dir, size), cfg, steps)
    else:
        with tempfile.TemporaryDirectory() as out:
            result = learn_textual_inversion(pipe, images_dir, out, cfg, progress=False)
            losses, seconds = result.losses, result.seconds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds_per_step": seconds / steps, "peak_rss_mb": peak / 1024, "losses": losses})


def measure(variant: str, model: str, images_dir: str, batch: int, steps: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=run_variant, args=(variant, model, images_dir, batch, steps, threads, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", default="toy,sd-fixture", help="toy, sd-fixture, or paths")
    args = parser.parse_args(argv)

    from conceptkit.models.fixtures import build_tiny_sd
    from conceptkit.shapes.concepts import CONCEPTS, concept_folder

    images = str(concept_folder(CONCEPTS[0]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            path = str(build_tiny_sd(Path(tmp) / "sd", seed=0)) if model == "sd-fixture" else model
            ref = measure("reference", path, images, args.batch, args.steps, args.threads)
            ours = measure("conceptkit", path, images, args.batch, args.steps, args.threads)
            # The noise floor: the same conceptkit loop on another thread count (float summation order changes).
            other = measure("conceptkit", path, images, args.batch, args.steps, 1 if args.threads > 1 else 2)
            gap = max(abs(a - b) for a, b in zip(ref["losses"], ours["losses"]))
            floor = max(abs(a - b) for a, b in zip(other["losses"], ours["losses"]))
            rows.append((model, ref, ours, gap, floor))
            print(f"{model}: done", file=sys.stderr)
    print(f"Textual Inversion, batch {args.batch}, {args.steps} steps, {args.threads} CPU thread(s), "
          f"torch {torch.__version__}\n")
    print("| model | reference s/step | conceptkit s/step | speed-up | reference peak RSS MB | conceptkit peak RSS MB "
          "| max loss difference | same loop, other thread count |")
    print("|---|---|---|---|---|---|---|---|")
    for model, ref, ours, gap, floor in rows:
        print(f"| {model} | {ref['seconds_per_step']:.3f} | {ours['seconds_per_step']:.3f} | "
              f"{ref['seconds_per_step'] / ours['seconds_per_step']:.2f}x | {ref['peak_rss_mb']:.0f} | "
              f"{ours['peak_rss_mb']:.0f} | {gap:.1e} | {floor:.1e} |")


if __name__ == "__main__":
    main()
