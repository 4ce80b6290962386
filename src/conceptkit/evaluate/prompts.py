"""The fixed held-out prompt sets of the shapes world (never seen in training, never used for tuning).

Objects use HELD_OUT_TRIPLES (shape/colour/pattern combinations absent from every training image) and only named
shapes, so every prompt is unambiguous. Sampling seeds start at EVAL_SEED_BASE; training never draws from there.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..shapes.captions import caption
from ..shapes.world import BACKGROUNDS, EVAL_SEED_BASE, HELD_OUT_TRIPLES, POSITIONS, SIZES, Obj, Scene


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    scene: Scene


def base_prompts(n_single: int = 64, n_double: int = 32) -> tuple[list[EvalPrompt], list[EvalPrompt]]:
    rng = random.Random(EVAL_SEED_BASE)
    single, double = [], []
    for i in range(n_single):
        shape, color, pattern = HELD_OUT_TRIPLES[i % len(HELD_OUT_TRIPLES)]
        obj = Obj(shape, color, pattern, rng.choice(list(POSITIONS)), rng.choice(list(SIZES)))
        scene = Scene(rng.choice(list(BACKGROUNDS)), (obj,))
        single.append(EvalPrompt(caption(scene), scene))
    for i in range(n_double):
        a, b = rng.sample(HELD_OUT_TRIPLES, 2)
        objs = (Obj(*a, position="left", size="medium"), Obj(*b, position="right", size="medium"))
        scene = Scene(rng.choice(list(BACKGROUNDS)), objs)
        double.append(EvalPrompt(caption(scene), scene))
    return single, double


def eval_seeds(n: int = 2) -> list[int]:
    return [EVAL_SEED_BASE + k for k in range(n)]
