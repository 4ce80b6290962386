"""Composing concepts of different kinds on the shapes world: a Textual Inversion word or a ProFusion image beside a
concept LoRA, against both concepts as LoRAs (CLoRA, `conceptkit compose --lora/--embedding/--image`).

For each pair of the bundled concept sets ("a {A} on the left and a {B} on the right, on a <bg> background", the pairs
and backgrounds of the first `evaluate clora`) and each assignment of kinds, CLoRA samples the held-out seeds of
`evaluate clora`
with its settings (30 DDIM steps, updates on the first 15, 10 refinements at step 0) and the oracle scores every
image like `evaluate clora` does: **success** = exactly two objects, matching the two concepts one-to-one in shape,
colour and pattern; **concepts found** = the share of the two concepts that appear with all three attributes; and
per side, how often the left (A) and the right (B) concept is found.
Concepts: the bundled LoRAs (`bundled/loras/`), Textual Inversion words learned here with the shipped recipe (600
steps; kept in --out and reused), and for images the first picture of the concept set with the bundled PromptNet.

`python benchmarks/mixed_concepts.py --seeds 4 --threads 1` prints a markdown table (`--json FILE` writes it too).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

KINDS = {"lora": "LoRA", "embedding": "TI word", "image": "ProFusion image"}
ASSIGNMENTS = (("lora", "lora"), ("embedding", "lora"), ("lora", "embedding"), ("image", "lora"))
PAIRS = ("red-striped-star+pink-checkered-cross", "pink-checkered-cross+purple-dotted-diamond")
# the first `evaluate clora` benchmark's prompts over the bundled concept sets (shapes/concepts.py CONCEPTS)
TEMPLATE = "a {{{a}}} on the left and a {{{b}}} on the right, on a {bg} background"
BACKGROUNDS = ("gray", "white", "navy", "teal", "brown", "gray")


def pairs():
    import itertools

    from conceptkit.shapes.concepts import CONCEPTS

    return [(a, b, BACKGROUNDS[i]) for i, (a, b) in enumerate(itertools.combinations(CONCEPTS, 2))]


def slot(concept) -> str:
    return concept.name.split("-")[-1]


def learned_word(concept, out: Path, threads: int) -> Path:
    """The concept's Textual Inversion embedding (trained once into out/<name>, with the shipped recipe)."""
    from conceptkit.learn.textual_inversion import learn_textual_inversion
    from conceptkit.learn.ti_config import TIConfig
    from conceptkit.models.loading import load_pipeline
    from conceptkit.shapes.concepts import concept_folder

    folder = out / concept.name
    if not (folder / "learned_embeds.safetensors").exists():
        began = time.perf_counter()
        learn_textual_inversion(load_pipeline("toy"), concept_folder(concept), folder,
                                TIConfig(token=f"<{concept.name}>", validation_prompts=()), model_name="toy",
                                resume=folder.exists(), progress=False)
        print(f"learned <{concept.name}> in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return folder


def spec(kind: str, slot: str, concept, words: Path):
    from conceptkit.compose.concepts import EmbeddingSpec, ImageSpec, LoraSpec
    from conceptkit.evaluate.clora import bundled_loras_path
    from conceptkit.shapes.captions import shape_word
    from conceptkit.shapes.concepts import concept_folder

    noun = shape_word(concept.shape)
    if kind == "lora":
        return LoraSpec(slot, str(bundled_loras_path() / f"{concept.name}.safetensors"))
    if kind == "embedding":
        return EmbeddingSpec(slot, str(words / concept.name), f"<{concept.name}>", noun)
    return ImageSpec(slot, str(sorted(concept_folder(concept).glob("*.png"))[0]), noun)


def found(image, a, b) -> tuple[bool, bool, bool]:
    """(left concept found, right concept found, success) by the oracle."""
    from conceptkit.shapes import oracle

    got = [(o.shape, o.color, o.pattern) for o in oracle.read(image).objects]
    want = [(c.shape, c.color, c.pattern) for c in (a, b)]
    return want[0] in got, want[1] in got, len(got) == 2 and sorted(got) == sorted(want)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="held-out seeds per pair (evaluate clora's, in order)")
    parser.add_argument("--pairs", default=",".join(PAIRS), help="A+B concept-set names, comma-separated")
    parser.add_argument("--out", default="outputs/mixed-concepts", help="learned words, images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from conceptkit.compose.config import CLoRAConfig
    from conceptkit.compose.run import compose
    from conceptkit.evaluate.clora import EVAL_SEEDS, unload_concepts
    from conceptkit.models.loading import BUNDLED_PROMPTNET, load_pipeline

    out = Path(args.out)
    backgrounds = {(a.name, b.name): bg for a, b, bg in pairs()}
    by_name = {c.name: c for a, b, _ in pairs() for c in (a, b)}
    chosen = [tuple(by_name[n] for n in p.split("+")) for p in args.pairs.split(",")]
    seeds = list(EVAL_SEEDS[: args.seeds])
    cfg = CLoRAConfig(steps=30, iterative_steps=(0,), iterative_steps_steps=10)
    needed = {c.name: c for a, b in chosen for (ka, kb) in ASSIGNMENTS for c, k in ((a, ka), (b, kb))
              if k == "embedding"}
    words = out / "words"
    for concept in needed.values():
        learned_word(concept, words, args.threads)

    pipe = load_pipeline("toy")
    rows = {assignment: {"left": 0, "right": 0, "success": 0, "n": 0, "seconds": 0.0} for assignment in ASSIGNMENTS}
    for a, b in chosen:
        template = TEMPLATE.format(a=slot(a), b=slot(b), bg=backgrounds[(a.name, b.name)])
        for kinds in ASSIGNMENTS:
            specs = [spec(kinds[0], slot(a), a, words), spec(kinds[1], slot(b), b, words)]
            composed = compose(pipe, template, specs, methods=["clora"], seeds=seeds, cfg=cfg,
                               promptnet=BUNDLED_PROMPTNET, out_dir=out / "images" / f"{slot(a)}-{slot(b)}" / "+".join(kinds))
            row = rows[kinds]
            for image in composed.images["clora"]:
                left, right, ok = found(image, a, b)
                row["left"] += left
                row["right"] += right
                row["success"] += ok
                row["n"] += 1
            row["seconds"] += composed.seconds["clora"] * len(seeds)
            unload_concepts(pipe)
            print(f"{slot(a)}+{slot(b)} {'+'.join(kinds)}: {json.dumps({k: v for k, v in row.items()})}",
                  file=sys.stderr)

    print(f"CLoRA on the bundled model, pairs {', '.join(f'{a.name} + {b.name}' for a, b in chosen)}, "
          f"{len(seeds)} held-out seeds each, 30 DDIM steps, {args.threads} CPU thread(s)\n")
    print("| left concept | right concept | images | success | concepts found | left found | right found | s / image |")
    print("|---|---|---|---|---|---|---|---|")
    table = {}
    for (ka, kb), r in rows.items():
        n = r["n"]
        table[f"{ka}+{kb}"] = {k: round(r[k] / n, 4) for k in ("left", "right", "success")}
        table[f"{ka}+{kb}"].update(concepts_found=round((r["left"] + r["right"]) / (2 * n), 4),
                                   seconds_per_image=round(r["seconds"] / n, 2), images=n)
        t = table[f"{ka}+{kb}"]
        print(f"| {KINDS[ka]} | {KINDS[kb]} | {n} | {t['success']:.3f} | {t['concepts_found']:.3f} | {t['left']:.3f} | "
              f"{t['right']:.3f} | {t['seconds_per_image']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"pairs": args.pairs, "seeds": seeds, "results": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
