"""Sampling regression: the images of every sampling path on the bundled model with fixed seeds.

`--save DIR` writes them as PNGs (DIR/<case>/<i>.png); `--compare DIR` makes them again and prints, per case, the
largest pixel difference (0-255) against DIR and whether every image is bitwise identical. Cases: `generate` with
two schedulers, `compose` with every method (the bundled LoRAs), ProFusion's fusion (the PromptNet's recommended
settings and the notebook's) and plain sampling (the bundled PromptNet). Uses only the public Python API, so the
same script runs before and after a refactor of the loops.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

STEPS = 12
PROMPTS = ["a large red striped star in the center, on a navy background",
           "a small cyan dotted moon on the left, on a white background"]
COMPOSE_PROMPT = "a {star} on the left and a {cross} on the right, on a gray background"
PROFUSION_PROMPTS = ["a small S* on the left, on a navy background", "a large S* at the bottom, on a white background"]


def cases(pipe_factory):
    """(name, function returning a list of PIL images)."""
    from conceptkit.compose.config import CLoRAConfig
    from conceptkit.compose.run import LoraSpec, compose
    from conceptkit.generate.images import generate

    def gen(scheduler):
        def run():
            pipe = pipe_factory()
            return generate(pipe, PROMPTS, seed=3, num_images=2, steps=STEPS, scheduler=scheduler,
                            progress=False).images
        return run

    out = [(f"generate-{s}", gen(s)) for s in ("ddim", "euler-a", "dpm++")]

    loras = Path(__import__("conceptkit").__file__).parent / "bundled" / "loras"
    specs = [LoraSpec("star", str(loras / "red-striped-star.safetensors")),
             LoraSpec("cross", str(loras / "pink-checkered-cross.safetensors"))]
    cfg = CLoRAConfig(steps=STEPS, iterative_steps=(0,), iterative_steps_steps=2)
    for method in ("clora", "reference", "merge", "switch", "composite", "none"):
        def run(method=method):
            pipe = pipe_factory()
            return compose(pipe, COMPOSE_PROMPT, specs, methods=[method], seeds=[0, 1], cfg=cfg).images[method]
        out.append((f"compose-{method}", run))

    def profusion(kind):
        def run():
            from conceptkit.learn.images import load_reference_image
            from conceptkit.models.loading import bundled_promptnet_path
            from conceptkit.profusion.sampling import FusionConfig, generate_profusion, recommended_fusion
            from conceptkit.profusion.saved import load_promptnet
            from conceptkit.shapes.render import render
            from conceptkit.shapes.world import Obj, Scene

            pipe = pipe_factory()
            saved = load_promptnet(bundled_promptnet_path("toy"), pipe)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "ref.png"
                scene = Scene("gray", (Obj("star", "red", "striped", "center", "large"),), ((0, 0),))
                Image.fromarray(render(scene)).save(path)
                reference = load_reference_image(path, 64)
            cfg = {"fusion": recommended_fusion(saved), "fusion-notebook": FusionConfig(),
                   "plain": FusionConfig.plain()}[kind]
            from dataclasses import replace
            return generate_profusion(pipe, saved, reference, PROFUSION_PROMPTS, replace(cfg, steps=STEPS), seed=5,
                                      num_images=2, progress=False).images
        return run

    out += [(f"profusion-{k}", profusion(k)) for k in ("fusion", "fusion-notebook", "plain")]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="write the images here")
    group.add_argument("--compare", help="compare against the images written here")
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from conceptkit.models.loading import load_pipeline

    only = set(args.only.split(",")) if args.only else None
    rows = []
    decoded = []  # every latent the VAE decodes (after post_quant_conv): a bitwise check finer than 8-bit pixels

    def pipe_factory():
        pipe = load_pipeline("toy", device="cpu")
        pipe.vae.decoder.register_forward_pre_hook(lambda mod, a: decoded.append(a[0].detach().clone()))
        return pipe

    for name, run in cases(pipe_factory):
        if only and name not in only:
            continue
        torch.manual_seed(0)  # the reference executions draw from the global RNG
        decoded.clear()
        images = run()
        latents = torch.cat(decoded)
        if args.save:
            folder = Path(args.save) / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(images):
                im.save(folder / f"{i}.png")
            torch.save(latents, folder / "latents.pt")
            print(f"{name}: {len(images)} images", file=sys.stderr)
            continue
        folder = Path(args.compare) / name
        diffs = []
        for i, im in enumerate(images):
            want = np.asarray(Image.open(folder / f"{i}.png").convert("RGB"), dtype=np.int16)
            got = np.asarray(im.convert("RGB"), dtype=np.int16)
            diffs.append(int(np.abs(want - got).max()))
        want_latents = torch.load(folder / "latents.pt")
        same_latents = want_latents.shape == latents.shape and torch.equal(want_latents, latents)
        latent_diff = float((want_latents - latents).abs().max()) if want_latents.shape == latents.shape else float("nan")
        rows.append((name, max(diffs), all(d == 0 for d in diffs) and same_latents, len(images), latent_diff))
        print(f"{name}: max diff {max(diffs)}", file=sys.stderr)
    if rows:
        print("| case | images | max abs pixel diff (0-255) | max abs latent diff | bitwise identical (pixels and latents) |")
        print("|---|---|---|---|---|")
        for name, diff, same, n, ldiff in rows:
            print(f"| {name} | {n} | {diff} | {ldiff:.3g} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
