"""Single-LoRA fidelity per background: does a background's colour prior beat a concept LoRA?

`evaluate clora`'s single-LoRA fidelity (each LoRA alone in the benchmark's prompts, the other slot a plain class
word; a hit = the concept's shape, colour and pattern on its side), measured on one background at a time, with a
split's own concepts, LoRAs and seeds (tune by default: the LoRA recipe is chosen there). The tune split's cases
use navy and teal, the test split's gray and white; here every split's concepts meet every background.

    python benchmarks/lora_fidelity_backgrounds.py --seeds 2 [--split tune] [--backgrounds navy,teal,gray,white]
"""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=["tune", "test"], default="tune")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--backgrounds", default="navy,teal,gray,white")
    p.add_argument("--loras", default=None, help="a folder of concept LoRAs (default: the bundled ones)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from conceptkit.compose.config import CLoRAConfig
    from conceptkit.evaluate import clora
    from conceptkit.models.loading import load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline("toy")
    seeds = clora.SPLIT_SEEDS[args.split][: args.seeds]
    names = [c.name for c in clora.SPLITS[args.split]]
    print("| background | images | " + " | ".join(names) + " | mean |")
    print("|---" * (len(names) + 3) + "|")
    for bg in args.backgrounds.split(","):
        clora.SPLIT_BACKGROUNDS[args.split] = (bg,)  # the split's cases, on this background only
        r = clora.single_lora_fidelity(pipe, CLoRAConfig(steps=30), split=args.split, seeds=seeds, loras=args.loras)
        images = len(clora.cases(args.split)) * 2 * len(seeds)
        print(f"| {bg} | {images} | " + " | ".join(f"{r[n]:.2f}" for n in names) + f" | {r['mean']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
