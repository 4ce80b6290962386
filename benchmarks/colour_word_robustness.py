"""How far each colour word can be weakened before the base model draws another colour.

A learned concept (a Textual Inversion word, a LoRA's trigger, ProFusion's S*) carries its colour less sharply than
the colour word the base model was trained on. This measures how the base model reads a weakened colour: the colour
word's input embedding e_c is replaced by alpha * e_c + (1 - alpha) * m, m the mean of the eight colour words'
embeddings (or, `--toward tokens`, of the whole vocabulary's), and the bundled model samples "a large {colour}
{pattern} circle on the left, on a {background} background" on every background; the oracle reads the colour of
the largest object. A cell: images kept in the colour out of `--seeds` per background, and the wrong colours.

    python benchmarks/colour_word_robustness.py --seeds 8 --threads 2
    python benchmarks/colour_word_robustness.py --colors yellow --patterns plain,striped,dotted,checkered

Seeds from 9,100,000 (no evaluation's). 30 DDIM steps, guidance 5.
"""
from __future__ import annotations

import argparse
import collections

SEED = 9_100_000


def main(argv=None) -> None:
    from conceptkit.shapes.world import BACKGROUNDS, COLORS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=8, help="images per (colour, pattern, alpha, background)")
    p.add_argument("--alphas", default="0.5,0.4,0.3", help="how much of the colour word is kept")
    p.add_argument("--colors", default=",".join(COLORS))
    p.add_argument("--patterns", default="checkered")
    p.add_argument("--toward", choices=["colours", "tokens"], default="colours",
                   help="weaken toward the colour words' mean embedding or the whole vocabulary's")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from conceptkit.generate.images import generate
    from conceptkit.models.loading import load_pipeline
    from conceptkit.shapes.oracle import read

    torch.set_num_threads(args.threads)
    pipe = load_pipeline("toy")
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = {c: pipe.tokenizer(c, add_special_tokens=False).input_ids for c in COLORS}
    assert all(len(v) == 1 for v in ids.values()), ids  # each colour is one token of the bundled tokenizer
    ids = {c: v[0] for c, v in ids.items()}
    original = table.detach().clone()
    toward = (original[list(ids.values())] if args.toward == "colours" else original).mean(0)
    alphas = [float(a) for a in args.alphas.split(",")]
    backgrounds = list(BACKGROUNDS)

    print(f"Colour word blended toward the {args.toward}' mean embedding; {args.seeds} seeds per cell from {SEED}; "
          "kept / images (wrong colours)\n")
    print("| colour | pattern | alpha | " + " | ".join(backgrounds) + " | all |")
    print("|---|---|---|" + "---|" * (len(backgrounds) + 1))
    for colour in args.colors.split(","):
        for pattern in args.patterns.split(","):
            for alpha in alphas:
                with torch.no_grad():
                    table[ids[colour]] = alpha * original[ids[colour]] + (1 - alpha) * toward
                try:
                    prompts = [f"a large {colour} {pattern} circle on the left, on a {bg} background"
                               for bg in backgrounds]
                    images = generate(pipe, prompts, seed=SEED, num_images=args.seeds, steps=30,
                                      guidance_scale=5.0, progress=False).images
                finally:
                    with torch.no_grad():
                        table[ids[colour]] = original[ids[colour]]
                read_colours = []
                for image in images:
                    objects = read(image).objects
                    read_colours.append(max(objects, key=lambda o: o.area).color if objects else "none")
                cells, kept_all = [], 0
                for k in range(len(backgrounds)):
                    got = collections.Counter(read_colours[k * args.seeds:(k + 1) * args.seeds])
                    kept = got.pop(colour, 0)
                    kept_all += kept
                    wrong = ", ".join(f"{c} {n}" for c, n in got.most_common())
                    cells.append(f"{kept}/{args.seeds}" + (f" ({wrong})" if wrong else ""))
                print(f"| {colour} | {pattern} | {alpha:g} | " + " | ".join(cells)
                      + f" | {kept_all}/{args.seeds * len(backgrounds)} |", flush=True)


if __name__ == "__main__":
    main()
