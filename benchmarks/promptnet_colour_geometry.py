"""How far apart PromptNet puts the colours, and how far apart the VAE put them first (README, ProFusion, "Where the
colour goes").

1. The VAE: each colour's large plain square on gray, encoded (posterior mean); the latent at the image centre
   (2 x 2 latent pixels); the table of distances between colours.
2. PromptNet: S* of the large centred reference of every shape x colour x pattern (one draw of x_ref, one x_t shared
   by all, t = 800 and 400, concatenated), cosine between references that differ in one attribute only, and the
   colour x colour table of mean cosines over the shape x pattern pairs.

    python benchmarks/promptnet_colour_geometry.py [--promptnet DIR]   # default: the bundled PromptNet (~1 min)
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

from conceptkit.evaluate.profusion import prepare
from conceptkit.models.loading import bundled_promptnet_path, load_pipeline
from conceptkit.profusion.saved import load_promptnet
from conceptkit.profusion.sampling import reference_latents
from conceptkit.shapes.render import render
from conceptkit.shapes.world import COLORS, NAMED_SHAPES, PATTERNS, Obj, Scene


def table(title: str, names: list[str], value) -> None:
    print(f"\n{title}\n| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for a in names:
        print(f"| {a} | " + " | ".join(f"{value(a, b):.2f}" for b in names) + " |")


def vae_centres(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for colour in COLORS:
        scene = Scene("gray", (Obj("square", colour, "plain", position="center", size="large"),), ((0, 0),))
        image = torch.from_numpy(render(scene)).permute(2, 0, 1)[None].float() / 127.5 - 1
        z = pipe.vae.encode(image).latent_dist.mean
        h = z.shape[-1] // 2
        out[colour] = z[0, :, h - 1:h + 1, h - 1:h + 1].mean(dim=(1, 2))
    return out


def words(pipe, saved, folder: Path) -> dict[tuple, torch.Tensor]:
    """S* (t = 800 and 400, concatenated, unit length) of each triple's large centred reference."""
    out, x_t = {}, None
    for triple in itertools.product(NAMED_SHAPES, COLORS, PATTERNS):
        case = prepare(triple, folder, pipe.unet.config.sample_size * pipe.vae_scale_factor, "compositional")
        x_ref = reference_latents(pipe, saved, case.reference, [torch.Generator().manual_seed(0)])
        if x_t is None:
            x_t = torch.randn(x_ref.shape, generator=torch.Generator().manual_seed(1))
        tokens = saved.image_encoder(case.reference, x_ref)
        s = torch.cat([saved.promptnet(x_ref, torch.tensor([t]), tokens, x_t).reshape(-1) for t in (800, 400)])
        out[triple] = torch.nn.functional.normalize(s, dim=0)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--promptnet", help="a PromptNet folder (default: the bundled one)")
    ap.add_argument("--out", default="outputs/promptnet-colour-geometry", help="the rendered references")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline("toy")
    saved = load_promptnet(args.promptnet or bundled_promptnet_path("toy"), pipe)
    colours = list(COLORS)
    with torch.no_grad():
        centres = vae_centres(pipe)
        table("VAE: distance between the colours' centre latents", colours,
              lambda a, b: float((centres[a] - centres[b]).norm()))
        s = words(pipe, saved, Path(args.out))
    print("\n| references differ only in | mean cosine of their S* | pairs |\n|---|---|---|")
    for i, name in enumerate(("shape", "colour", "pattern")):
        sims = [float(s[a] @ s[b]) for a, b in itertools.combinations(s, 2)
                if a[i] != b[i] and all(a[j] == b[j] for j in range(3) if j != i)]
        print(f"| {name} | {statistics.mean(sims):.3f} | {len(sims)} |")
    table("PromptNet: mean cosine of S* between colours (same shape and pattern)", colours,
          lambda a, b: statistics.mean(float(s[(sh, a, p)] @ s[(sh, b, p)]) for sh in NAMED_SHAPES for p in PATTERNS))


if __name__ == "__main__":
    sys.exit(main())
