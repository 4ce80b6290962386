"""Two-object binding, taken apart: what goes wrong in the pictures, and where the maps look.

1. Pictures (`evaluate base`'s pair prompts, `--split`, `--seeds`): per object, is its shape / colour right, the
   other object's (a leak or a swap) or a third one; and per image, both right / swapped / one wrong.
2. Maps on real pictures (the same pair scenes rendered, VAE-encoded and noised to each `--timesteps` t, one UNet call
   with the canonical caption): for each attribute word of each object, the share of its cross-attention inside its
   own object's box and inside the other object's, per map resolution, word kind and mention order. A model that
   binds puts each word's attention in its own box at the timesteps where the layout is decided.
3. The same maps from the pixels' side: of the attention the cells inside an object's box give out, the share on
   that object's own words, on the other object's, on the rest of the text and on the end-of-text + padding states
   (which a causal text encoder fills with the whole prompt, both objects' attributes at once).

--drop-pooled replaces the prompt's end-of-text and padding states by the empty prompt's in part 1's sampling: if
attributes leak through those pooled states, fewer objects take the other's colour.

    python benchmarks/pair_binding.py --model runs/v4-snap --split tune --seeds 2 --timesteps 200,500,800
"""
from __future__ import annotations

import argparse
import collections
import contextlib

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
                for side, g, w, other in (("left", got[0], want[0], want[1]), ("right", got[1], want[1], want[0])):
                    verdict = "right" if g == w else "the other object's" if g == other else "a third"
                    counts[attr][verdict] += 1
                    counts[attr][f"{verdict} ({side})"] += 1
                kind = ("both right" if got == want else "swapped" if got == want[::-1] else "one or both wrong")
                counts["image"][f"{attr}: {kind}"] += 1
    return counts


@contextlib.contextmanager
def pooled_states_dropped(enabled: bool = True):
    """Plain sampling with each prompt's states from its end-of-text token on replaced by the empty prompt's."""
    from conceptkit.generate import plain

    original = plain.PromptModel.__init__

    def init(self, pipe, prompts, *args, **kwargs):
        original(self, pipe, prompts, *args, **kwargs)
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
        n = len(prompts)
        if self.guided:  # embeddings = [empty prompts; prompts]
            for b, row in enumerate(ids):
                end = row.index(pipe.tokenizer.eos_token_id)
                self.embeddings[n + b, end:] = self.embeddings[b, end:]

    if enabled:
        plain.PromptModel.__init__ = init
    try:
        yield
    finally:
        plain.PromptModel.__init__ = original


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
    """({(t, res, kind, '1st'|'2nd'): [(own share, other share), ...]},
    {(t, res): [(own words, other object's words, other text, end-of-text + padding), ...]} per box)"""
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
    out, reads = collections.defaultdict(list), collections.defaultdict(list)
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
                word_owner = torch.tensor(token_owners(tokens, scene))
                pooled = torch.arange(len(row)) >= row.index(tok.eos_token_id)
                for k in (0, 1):
                    given = (maps[b] * (boxes[k] / boxes[k].sum())[:, None]).sum(0)  # the box cells' mean row
                    reads[(t, res)].append(tuple(float(given[sel].sum()) for sel in (
                        word_owner == k, word_owner == 1 - k, (word_owner < 0) & ~pooled, pooled)))
                for i, owner in enumerate(owners):
                    kind = word_kind(words[i])
                    if owner < 0 or not kind:
                        continue
                    m = maps[b, :, i] / maps[b, :, i].sum()
                    out[(t, res, kind, "1st" if i < split else "2nd")].append(
                        (float((m * boxes[owner]).sum()), float((m * boxes[1 - owner]).sum())))
    return out, reads


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--split", choices=["test", "tune"], default="tune")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--timesteps", default="200,500,800")
    parser.add_argument("--resolutions", default="16,8,4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--drop-pooled", action="store_true",
                        help="sample with the end-of-text/padding states replaced by the empty prompt's")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from conceptkit.evaluate.prompts import base_prompts, eval_seeds
    from conceptkit.models.loading import load_pipeline

    pipe = load_pipeline(args.model)
    _, pairs = base_prompts(split=args.split)
    with pooled_states_dropped(args.drop_pooled):
        counts = picture_errors(pipe, pairs, eval_seeds(args.seeds, args.split))
    print(f"{args.model}, {args.split} split, {len(pairs)} pair prompts x {args.seeds} seeds"
          f"{', pooled states dropped' if args.drop_pooled else ''}\n")
    other = "the other object's"
    print(f"| object's | right | {other} (left / right object) | a third |\n|---|---|---|---|")
    for attr in ("shape", "color"):
        c = counts[attr]
        print(f"| {attr} | {c['right']} | {c[other]} ({c[other + ' (left)']} / {c[other + ' (right)']}) | "
              f"{c['a third']} |")
    print("\n| per image | count |\n|---|---|")
    for key, n in sorted(counts["image"].items()):
        print(f"| {key} | {n} |")
    shares, reads = map_shares(pipe, pairs, [int(t) for t in args.timesteps.split(",")],
                        tuple(int(r) for r in args.resolutions.split(",")))
    print("\n| t | maps | word | mention | words | own box share | other box share | own > other |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(shares, key=lambda k: (k[0], -k[1], k[2], k[3])):
        v = torch.tensor(shares[key])
        print(f"| {key[0]} | {key[1]}x{key[1]} | {key[2]} | {key[3]} | {len(v)} | {v[:, 0].mean():.2f} | "
              f"{v[:, 1].mean():.2f} | {(v[:, 0] > v[:, 1]).float().mean():.2f} |")
    print("\n| t | maps | box cells' attention on: own words | other object's words | other text | "
          "end-of-text + padding |")
    print("|---|---|---|---|---|---|")
    for (t, res), rows in sorted(reads.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        v = torch.tensor(rows).mean(0).tolist()
        print(f"| {t} | {res}x{res} | " + " | ".join(f"{x:.2f}" for x in v) + " |")


if __name__ == "__main__":
    main()
