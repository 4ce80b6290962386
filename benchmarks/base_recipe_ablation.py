"""Controlled A/B of base-model recipes: continue one shipped model under each recipe, same data, seeds and steps.

Every arm starts from the same export (its EMA weights, a fresh optimizer and warm-up), trains the same number of
steps on the same pre-encoded scenes with the same per-step draws, and differs only in its `--arm` recipe fields.
Scored on the *tune* split (`evaluate base --split tune`, attention localization with its tune pairs and seeds), so
the held-out test split stays unseen while recipes are chosen. Resumable: a finished arm is not re-run.

    python benchmarks/base_recipe_ablation.py --from src/conceptkit/bundled/shapes-base --steps 400 \\
        --common lr=3e-4 warmup=100 latent_pool=30000 \\
        --arm min_snr loss_weighting=min_snr --arm flat loss_weighting=flat
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

KEYS = ["single.shape", "single.color", "single.pattern", "single.position", "single.background",
        "double.both_present", "double.both_shapes_correct", "double.both_colors_correct"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", default="src/conceptkit/bundled/shapes-base")
    parser.add_argument("--work", default="runs/ablation")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--common", nargs="*", default=[], help="recipe fields for every arm (KEY=VALUE)")
    parser.add_argument("--arm", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                        help="an arm: its name, then its recipe fields")
    parser.add_argument("--seeds", type=int, default=2, help="evaluate base seeds (tune split)")
    parser.add_argument("--attention-seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from attention_localization import measure
    from conceptkit.evaluate.base import evaluate_base
    from conceptkit.models.loading import load_pipeline
    from conceptkit.shapes import train_base

    work = Path(args.work)
    start = json.loads((Path(args.source) / "training.json").read_text())["unet_steps"]
    results = {}
    for name, *fields in args.arm:
        folder = work / name
        done = folder / "results.json"
        if not done.exists():
            overrides = train_base.parse_overrides(args.common + fields)
            run = folder / "run"
            shared = work / f"latents-{overrides.get('latent_pool', 'default')}-{overrides.get('p_pair', 0.4)}"
            if not (run / "recipe.json").exists():
                if run.exists():
                    shutil.rmtree(run)
                train_base.seed_run_from_export(run, args.source, overrides)
                if shared.exists():  # the same scenes for every arm: encode them once
                    os.link(shared, run / "latents.safetensors")
            train_base.train(run, train_base.Recipe(unet_steps=start + args.steps), resume=True)
            if not shared.exists():
                os.link(run / "latents.safetensors", shared)
            export = train_base.export(run, folder / "export")
            pipe = load_pipeline(str(export))
            scores = evaluate_base(pipe, seeds=args.seeds, split="tune", progress=False)
            attention, _ = measure(pipe, [16, 8], seeds=args.attention_seeds, split="tune")
            scores.update({f"attention.{res}": row["left_noun_lefter"] for res, row in attention.items()})
            log = [json.loads(line) for line in (run / "unet_log.jsonl").read_text().splitlines()]
            scores["band_loss_last"] = log[-1].get("band_loss")
            scores["fields"] = fields
            done.write_text(json.dumps(scores, indent=2) + "\n")
        results[name] = json.loads(done.read_text())
    cols = KEYS + ["attention.16", "attention.8"]
    print(f"{args.steps} steps from {args.source} (step {start}); common: {' '.join(args.common)}; tune split")
    print("| arm | " + " | ".join(c.replace("single.", "").replace("double.", "2obj ") for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in results.items():
        print(f"| {name} ({' '.join(r['fields'])}) | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
