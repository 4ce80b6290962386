"""LoRA recipe on the bundled model: train on a bundled concept set, sample, read the images with the oracle.

For each step count in --steps (one run, resumed from its checkpoint to the next count): load the LoRA, sample
"a zwx object" at --seeds held-out seeds and the five compositional prompts of `evaluate ti` at 2 seeds each
(25 DDIM steps), and print one JSON line: plain fidelity (shape, colour and pattern all right on "a zwx object"),
fidelity over all images, adherence (requested background / position / size) and the training seconds so far.
The figures in learn/lora_config.py come from

    for c in red-striped-star cyan-dotted-moon pink-checkered-cross purple-dotted-diamond; do
        python benchmarks/lora_recipe.py --concept $c --steps 200,400,800 --baseline; done

(one CPU thread each; two busy processes on 2 threads each slow each other down many times).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from conceptkit.evaluate.ti import COMPOSITIONAL, score
from conceptkit.generate.images import generate
from conceptkit.learn.lora import learn_lora
from conceptkit.learn.lora_config import LoRAConfig
from conceptkit.models.loading import load_pipeline
from conceptkit.models.lora import load_lora
from conceptkit.shapes.concepts import by_name, concept_folder
from conceptkit.shapes.world import EVAL_SEED_BASE


def evaluate(pipe, concept, seeds: int, out: Path) -> dict:
    plain = generate(pipe, ["a zwx object"], seed=EVAL_SEED_BASE, num_images=seeds, steps=25, progress=False,
                     out_dir=out / "plain")
    comp = generate(pipe, [t.format("zwx object") for t, _ in COMPOSITIONAL], seed=EVAL_SEED_BASE, num_images=2,
                    steps=25, progress=False, out_dir=out / "compositional")
    requested = [{}] * seeds + [r for _, r in COMPOSITIONAL for _ in range(2)]
    rows = [score(image, concept, r) for image, r in zip(plain.images + comp.images, requested)]
    checks = [v for r in rows[seeds:] for k, v in r.items() if k != "fidelity"]
    return {"fidelity_plain": round(sum(r["fidelity"] for r in rows[:seeds]) / seeds, 3),
            "fidelity_all": round(sum(r["fidelity"] for r in rows) / len(rows), 3),
            "adherence": round(sum(checks) / len(checks), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concept", default="red-striped-star")
    ap.add_argument("--steps", default="200,400,800", help="comma-separated step counts to evaluate at")
    ap.add_argument("--lr", type=float, default=LoRAConfig.lr)
    ap.add_argument("--rank", type=int, default=LoRAConfig.rank)
    ap.add_argument("--batch", type=int, default=LoRAConfig.batch)
    ap.add_argument("--no-text-encoder", action="store_true")
    ap.add_argument("--flip-p", type=float, default=LoRAConfig.flip_p)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--baseline", action="store_true", help="also score the model without a LoRA")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="outputs/lora-recipe")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    concept = by_name(a.concept)
    pipe = load_pipeline("toy")
    out = Path(a.out) / f"{a.concept}-lr{a.lr}-r{a.rank}-b{a.batch}-te{int(not a.no_text_encoder)}-f{a.flip_p}"
    shutil.rmtree(out, ignore_errors=True)
    if a.baseline:
        print(json.dumps({"concept": a.concept, "steps": 0, **evaluate(pipe, concept, a.seeds, out / "baseline")}))
    seconds = 0.0
    for steps in [int(x) for x in a.steps.split(",")]:
        cfg = LoRAConfig(trigger="zwx", prompt="a zwx object", steps=steps, lr=a.lr, rank=a.rank, batch=a.batch,
                         text_encoder=not a.no_text_encoder, flip_p=a.flip_p, validation_prompts=(),
                         checkpoint_every=10**9)
        t0 = time.perf_counter()
        result = learn_lora(pipe, concept_folder(concept), out / "lora", cfg, model_name="toy", progress=False,
                            resume=True)
        seconds += time.perf_counter() - t0
        load_lora(pipe, out / "lora", "zwx")
        scores = evaluate(pipe, concept, a.seeds, out / f"step-{steps}")
        pipe.unload_lora_weights()
        print(json.dumps({"concept": a.concept, "steps": steps, "lr": a.lr, "rank": a.rank, "batch": a.batch,
                          "text_encoder": not a.no_text_encoder, "train_s": round(seconds),
                          "loss_last20": round(sum(result.losses[-20:]) / len(result.losses[-20:]), 4), **scores}),
              flush=True)


if __name__ == "__main__":
    main()
