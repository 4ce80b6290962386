"""Where S*'s colour goes in two-object prompts (README, ProFusion, "Where the colour goes"): does the object that S*
stands for take the colour *written* for the second object?

For each `evaluate profusion` test object, S* alone (the pre-trained PromptNet, plain sampling at the folder's s, no
fine-tuning) samples the benchmark's four two-object prompts twice: as written, and with only the second object's
colour word replaced by one far from both colours (blue, else cyan, else green). The oracle reads the colour of the
object on S*'s side. A leak is a wrong colour equal to the second object's written colour. The one-object prompts
are read too (no other colour is written there).
Seeds start at 9,000,000, which no evaluation uses: this diagnoses a miss on the test objects, it chooses nothing.

    python benchmarks/profusion_colour_leak.py [--seeds 8] [--colors yellow,orange]   # ~1 min per object
    # --reference-background white: each reference rendered on another background (the evaluation's: gray)
    # --promptnet DIR: another PromptNet folder (its recommended s unless --emb-scale)
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from conceptkit.evaluate.profusion import TEST_TRIPLES, at, prepare, test_scene
from conceptkit.models.loading import bundled_promptnet_path, load_pipeline
from conceptkit.profusion.sampling import generate_profusion, recommended_plain
from conceptkit.profusion.saved import load_promptnet
from conceptkit.shapes.captions import object_phrase
from conceptkit.shapes.oracle import read
from conceptkit.shapes.render import render

SEED0 = 9_000_000
FAR = ("blue", "cyan", "green")


def replaced(prompt, object_colour: str):
    """(text, second object) with the second object's colour replaced by the first FAR colour unlike both."""
    second = prompt.requested["second"]
    colour = next(c for c in FAR if c not in (second.color, object_colour))
    new = dataclasses.replace(second, color=colour)
    return prompt.text.replace(object_phrase(second), object_phrase(new)), new


def colours_read(images, sides) -> list[str]:
    """The colour of the object on each image's side (the largest object when side is None), or 'none'."""
    out = []
    for image, side in zip(images, sides):
        reading = read(image)
        obj = at(reading, side) if side else max(reading.objects, key=lambda o: o.area, default=None)
        out.append(obj.color if obj else "none")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--colors", default="", help="only the test objects of these colours (comma-separated)")
    ap.add_argument("--emb-scale", type=float, help="s (default: the PromptNet folder's recommended value)")
    ap.add_argument("--reference-background", help="render each reference on this background instead")
    ap.add_argument("--promptnet", help="a PromptNet folder (default: the bundled one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline("toy")
    saved = load_promptnet(args.promptnet or bundled_promptnet_path("toy"), pipe)
    cfg = dataclasses.replace(recommended_plain(saved), steps=30)
    if args.emb_scale is not None:
        cfg = dataclasses.replace(cfg, emb_scale=args.emb_scale)
    wanted = set(filter(None, args.colors.split(",")))
    objects = [t for t in TEST_TRIPLES if not wanted or t[1] in wanted]
    print(f"S* alone, 30 steps, s = {cfg.emb_scale}, {args.seeds} seeds from {SEED0}, references on "
          f"{args.reference_background or test_scene(objects[0]).background}\n")
    print("| test object | one-object prompts: colour kept (wrong colours) | two-object, as written: kept (wrong) "
          "| of the wrong, the second's written colour | two-object, second's colour replaced: kept (wrong) |")
    print("|---|---|---|---|---|")
    totals = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for triple in objects:
            case = prepare(triple, Path(tmp), pipe.unet.config.sample_size * pipe.vae_scale_factor, "moved")
            if args.reference_background:
                scene = dataclasses.replace(test_scene(triple), background=args.reference_background)
                reference = torch.from_numpy(render(scene)).permute(2, 0, 1)[None].float() / 127.5 - 1
                case = dataclasses.replace(case, reference=reference)
            one = [p for p in case.prompts if "second" not in p.requested]
            two = [p for p in case.prompts if "second" in p.requested]
            arms = {"one": ([p.text for p in one], [None] * len(one), [None] * len(one)),
                    "written": ([p.text for p in two], [p.requested["position"] for p in two],
                                [p.requested["second"].color for p in two])}
            swapped = [replaced(p, triple[1]) for p in two]
            arms["replaced"] = ([t for t, _ in swapped], arms["written"][1], [s.color for _, s in swapped])
            cells = {}
            for arm, (texts, sides, seconds) in arms.items():
                images = generate_profusion(pipe, saved, case.reference, texts, cfg, seed=SEED0,
                                            num_images=args.seeds, batch_size=len(texts) * args.seeds,
                                            progress=False).images
                got = colours_read(images, [s for s in sides for _ in range(args.seeds)])
                second = [c for c in seconds for _ in range(args.seeds)]
                wrong = collections.Counter(c for c in got if c != triple[1])
                leaks = sum(g != triple[1] and g == s for g, s in zip(got, second))
                kept = sum(g == triple[1] for g in got)
                totals[f"{arm} kept"] += kept
                totals[f"{arm} n"] += len(got)
                totals[f"{arm} wrong"] += len(got) - kept
                totals[f"{arm} leaks"] += leaks
                cells[arm] = (f"{kept}/{len(got)} ({', '.join(f'{c} {n}' for c, n in wrong.most_common()) or '—'})",
                              f"{leaks}/{len(got) - kept}")
            print(f"| {triple[1]} {triple[2]} {triple[0]} | {cells['one'][0]} | {cells['written'][0]} | "
                  f"{cells['written'][1]} | {cells['replaced'][0]} |", flush=True)
    t = totals
    print(f"| all | {t['one kept']}/{t['one n']} | {t['written kept']}/{t['written n']} | "
          f"{t['written leaks']}/{t['written wrong']} | {t['replaced kept']}/{t['replaced n']} |")


if __name__ == "__main__":
    sys.exit(main())
