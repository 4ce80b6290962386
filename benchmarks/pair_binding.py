"""Two-object binding, taken apart: what goes wrong in the pictures, and where the maps look.

1. Pictures (`evaluate base`'s pair prompts, `--split`, `--seeds`): per object, is its shape / colour right, the
   other object's (a leak or a swap) or a third one; and per image, both right / swapped / one wrong.
2. Maps on real pictures (the same pair scenes rendered, VAE-encoded and noised to each `--timesteps` t, one UNet call
   with the canonical caption): for each attribute word of each object, the share of its cross-attention inside its
   own object's box and inside the other object's, per map resolution, word kind and mention order. A model that
   binds puts each word's attention in its own box at the timesteps where the layout is decided.

    python benchmarks/pair_binding.py --model runs/v4-snap --split tune --seeds 2 --timesteps 200,500,800
"""
from __future__ import annotations

import argparse
import collections

import numpy as np
import torch


def picture_errors(pipe, prompts, seeds: list[int]) -> dict[str, collections.Counter]:
    from conceptkit.generate.images import generate
    from conceptkit.shapes import oracle

    counts = {"shape": collections.Counter(), "color": collections.Counter(), "image": collections.Counter()}
    for seed in seeds:
        out = generate(pipe, [p.text for p in prompts], seed=seed, num_images=1, steps=30, progress=False)
        for image, prompt in zip(out.images, prompts):
            read = oracle.read(image)
            left, right = prompt.scene.objects
            if read.count != 2:
                counts["image"]["not two objects"] += 1
                continue
            for attr in ("shape", "color"):
                got = [getattr(o, attr) for o in read.objects]
                want = [getattr(left, attr), getattr(right, attr)]
                for g, w, other in ((got[0], want[0], want[1]), (got[1], want[1], want[0])):
                    counts[attr]["right" if g == w else "the other object's" if g == other else "a third"] += 1
                kind = ("both right" if got == want else "swapped" if got == want[::-1] else "one or both wrong")
                counts["image"][f"{attr}: {kind}"] += 1
    return counts


def word_kind(word: str) -> str:
    from conceptkit.shapes.grounding import POSITION_WORDS
    from conceptkit.shapes.world import COLORS, NAMED_SHAPES, PATTERNS

    if word in COLORS:
        return "colour"
    if word in NAMED_SHAPES or word == "object":
        return "shape"
    if word in PATTERNS or word in ("stripes", "dots", "checks"):
        return "pattern"
    return "position" if word in POSITION_WORDS else ""


@torch.no_grad()
def map_shares(pipe, prompts, timesteps: list[int], resolutions: tuple[int, ...]) -> dict:
    """{(t, res, kind, '1st'|'2nd'): [(own share, other share), ...]}"""
    from conceptkit.compose.attention import capturing
    from conceptkit.shapes.grounding import GROUNDED_WORDS, box_coverage, token_owners
    from conceptkit.shapes.render import render
    from conceptkit.shapes.train_base import GroundingStore

    tok = pipe.tokenizer
    scenes = [p.scene for p in prompts]
    ids = tok([p.text for p in prompts], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    pixels = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    z0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    cond = pipe.text_encoder(ids)[0]
    out = collections.defaultdict(list)
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
        steps = torch.full((len(scenes),), t)
        store = GroundingStore(resolutions)
        store.maps = []
        with capturing(pipe.unet, store):
            pipe.unet(pipe.scheduler.add_noise(z0, noise, steps), steps, cond)
        for probs in store.maps:
            maps = probs.float().mean(1)  # (B, Q, T), heads averaged
            res = int(maps.shape[1] ** 0.5)
            for b, (row, scene) in enumerate(zip(ids.tolist(), scenes)):
                tokens = tok.convert_ids_to_tokens(row)
                words = [w.removesuffix("</w>") for w in tokens]
                owners = token_owners(tokens, scene, GROUNDED_WORDS["object+position"])
                boxes = [box_coverage(scene, k, res).flatten() for k in (0, 1)]
                split = words.index("and")
                for i, owner in enumerate(owners):
                    kind = word_kind(words[i])
                    if owner < 0 or not kind:
                        continue
                    m = maps[b, :, i] / maps[b, :, i].sum()
                    out[(t, res, kind, "1st" if i < split else "2nd")].append(
                        (float((m * boxes[owner]).sum()), float((m * boxes[1 - owner]).sum())))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--split", choices=["test", "tune"], default="tune")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--timesteps", default="200,500,800")
    parser.add_argument("--resolutions", default="16,8,4")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from conceptkit.evaluate.prompts import base_prompts, eval_seeds
    from conceptkit.models.loading import load_pipeline

    pipe = load_pipeline(args.model)
    _, pairs = base_prompts(split=args.split)
    counts = picture_errors(pipe, pairs, eval_seeds(args.seeds, args.split))
    print(f"{args.model}, {args.split} split, {len(pairs)} pair prompts x {args.seeds} seeds\n")
    print("| object's | right | the other object's | a third |\n|---|---|---|---|")
    for attr in ("shape", "color"):
        c = counts[attr]
        print(f"| {attr} | {c['right']} | {c['the other object' + chr(39) + 's']} | {c['a third']} |")
    print("\n| per image | count |\n|---|---|")
    for key, n in sorted(counts["image"].items()):
        print(f"| {key} | {n} |")
    shares = map_shares(pipe, pairs, [int(t) for t in args.timesteps.split(",")],
                        tuple(int(r) for r in args.resolutions.split(",")))
    print("\n| t | maps | word | mention | words | own box share | other box share | own > other |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(shares, key=lambda k: (k[0], -k[1], k[2], k[3])):
        v = torch.tensor(shares[key])
        print(f"| {key[0]} | {key[1]}x{key[1]} | {key[2]} | {key[3]} | {len(v)} | {v[:, 0].mean():.2f} | "
              f"{v[:, 1].mean():.2f} | {(v[:, 0] > v[:, 1]).float().mean():.2f} |")


if __name__ == "__main__":
    main()
