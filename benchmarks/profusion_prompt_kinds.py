"""Where does S* lose its object? Attributes kept per prompt kind, read from `evaluate profusion --out DIR`'s images.

`conceptkit evaluate profusion --prompts moved` averages over its 5 one-object prompts (other background, position,
size) and its 4 two-object prompts (a second object named in words). This reads the images the run saved
(DIR/<object>/<method>/NNN-...-sSEED.png) back with the oracle and prints, per method and prompt kind, the share of
images whose S* object kept its shape, colour and pattern (the same `score` as the evaluation).

    python benchmarks/profusion_prompt_kinds.py DIR [DIR ...] [--methods pretrained_plain,fusion]
"""
from __future__ import annotations

import argparse
from pathlib import Path


def kept_by_kind(root: Path, method: str) -> dict[str, dict[str, float]]:
    from PIL import Image

    from conceptkit.evaluate.profusion import bench_prompts, score

    tally: dict[tuple[str, str], list[bool]] = {}
    for obj in sorted(p for p in root.iterdir() if (p / method).is_dir()):
        color, pattern, shape = obj.name.split("-")
        prompts = bench_prompts((shape, color, pattern))
        images = sorted((obj / method).glob("[0-9][0-9][0-9]-*.png"))
        per_prompt = len(images) // len(prompts)  # seeds, the files in prompt-major order
        for i, f in enumerate(images):
            prompt = prompts[i // per_prompt]
            kind = "two objects" if "second" in prompt.requested else "one object"
            row = score(Image.open(f).convert("RGB"), (shape, color, pattern), prompt.requested)
            for attr in ("shape", "color", "pattern"):
                tally.setdefault((kind, attr), []).append(row[f"kept_{attr}"])
    out: dict[str, dict[str, float]] = {}
    for (kind, attr), v in tally.items():
        out.setdefault(kind, {})[attr] = sum(v) / len(v)
        out[kind]["images"] = len(v)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--methods", default="pretrained_plain")
    args = p.parse_args(argv)
    print("| run | method | prompts | images | shape | colour | pattern |")
    print("|---|---|---|---|---|---|---|")
    for root in args.folders:
        for method in args.methods.split(","):
            for kind, r in sorted(kept_by_kind(root, method).items()):
                print(f"| {root.name} | {method} | {kind} | {r['images']} | {r['shape']:.2f} | {r['color']:.2f} | "
                      f"{r['pattern']:.2f} |")


if __name__ == "__main__":
    main()
