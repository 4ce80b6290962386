"""How far apart PromptNet puts the colours, and how far apart the VAE put them first (README, ProFusion, "Where the
colour goes").

1. The VAE: each colour's large plain square on gray, encoded (posterior mean); the latent at the image centre
   (2 x 2 latent pixels); the table of distances between colours.
2. PromptNet: S* of the large centred reference of every shape x colour x pattern (one draw of x_ref, one x_t shared
   by all, t = 800 and 400, concatenated), cosine between references that differ in one attribute only, and the
   colour x colour table of mean cosines over the shape x pattern pairs.
3. The objective (`--objective PATTERNS`): what the denoising loss that TI, LoRAs and PromptNet minimise (MSE on the
   model's target, t uniform) charges for the wrong colour. For each named shape's large centred object of colour c
   on gray (posterior-mean latent), L(c') is the base model's loss with the canonical caption naming colour c'
   (24 timesteps 10..990 x 2 noise draws, the same for every c'); the table is gap(c -> c') = L(c') - L(c), x1000,
   the mean over the shapes. A small gap is a wrong colour the objective hardly tells from the right one.

    python benchmarks/promptnet_colour_geometry.py [--promptnet DIR] [--objective checkered,plain]
    # default: the bundled PromptNet, no objective table (~1 min; the objective adds ~3.5 min per pattern)
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


def objective_gaps(pipe, pattern: str) -> dict[str, list[float]]:
    """{true colour: [mean over shapes of L(written colour) - L(true colour), for each colour]}; L is Textual
    Inversion's own training loss (learn/textual_inversion.py ti_loss) on one batch of fixed timesteps and noise."""
    from conceptkit.learn.textual_inversion import Batch, ti_loss
    from conceptkit.shapes.captions import caption

    colours = list(COLORS)
    t = torch.linspace(10, 990, 24).long().repeat(2)
    gaps = {c: [0.0] * len(colours) for c in colours}
    for shape in NAMED_SHAPES:
        scenes = [Scene("gray", (Obj(shape, c, pattern, position="center", size="large"),), ((0, 0),)) for c in colours]
        ids = pipe.tokenizer([caption(s) for s in scenes], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        for c, scene in zip(colours, scenes):
            image = torch.from_numpy(render(scene)).permute(2, 0, 1)[None].float() / 127.5 - 1
            x0 = (pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor).expand(len(t), -1, -1, -1)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
            losses = [float(ti_loss(pipe, pipe.scheduler, Batch(x0, noise, t, torch.full((len(t),), k)), ids))
                      for k in range(len(colours))]
            for k, loss in enumerate(losses):
                gaps[c][k] += (loss - losses[colours.index(c)]) / len(NAMED_SHAPES)
    return gaps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--promptnet", help="a PromptNet folder (default: the bundled one)")
    ap.add_argument("--out", default="outputs/promptnet-colour-geometry", help="the rendered references")
    ap.add_argument("--objective", default="", help="patterns (comma-separated) for the objective's colour gaps")
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
    for pattern in filter(None, args.objective.split(",")):
        with torch.no_grad():
            gaps = objective_gaps(pipe, pattern)
        table(f"The objective, {pattern} objects on gray: L(written colour) - L(true colour), x1000 (row: true)",
              colours, lambda a, b: 1000 * gaps[a][colours.index(b)])
        print("\n| true colour | the wrong colour it is cheapest to write | gap x1000 |\n|---|---|---|")
        for c in colours:
            gap, nearest = min((g, w) for g, w in zip(gaps[c], colours) if w != c)
            print(f"| {c} | {nearest} | {1000 * gap:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
