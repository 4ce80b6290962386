"""The fixed held-out prompt sets of the shapes world (never seen in training, never used for tuning).

Objects use HELD_OUT_TRIPLES (shape/colour/pattern combinations absent from every training image) and only named
shapes, so every prompt is unambiguous. Sampling seeds start at EVAL_SEED_BASE; training never draws from there.

The tune split is for choosing recipes and settings: training combinations (named shapes), its own prompt draw and
seeds from TUNE_SEED_BASE, so nothing chosen on it has seen a held-out prompt or seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..shapes.captions import caption
import itertools

from ..shapes.world import (BACKGROUNDS, COLORS, EVAL_SEED_BASE, HELD_OUT_TRIPLES, NAMED_SHAPES, PATTERNS, POSITIONS,
                            SIZES, Obj, Scene)

TUNE_SEED_BASE = 2_000_000
SPLITS = ("test", "tune")


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    scene: Scene


def split_triples(split: str) -> tuple[tuple[str, str, str], ...]:
    if split == "test":
        return HELD_OUT_TRIPLES
    if split == "tune":
        held = set(HELD_OUT_TRIPLES)
        rng = random.Random(TUNE_SEED_BASE)
        seen = [t for t in itertools.product(NAMED_SHAPES, COLORS, PATTERNS) if t not in held]
        return tuple(rng.sample(seen, len(HELD_OUT_TRIPLES)))
    raise ValueError(f"split {split!r}: use one of {SPLITS}")


def base_prompts(n_single: int = 64, n_double: int = 32,
                 split: str = "test") -> tuple[list[EvalPrompt], list[EvalPrompt]]:
    triples = split_triples(split)
    rng = random.Random(EVAL_SEED_BASE if split == "test" else TUNE_SEED_BASE)
    single, double = [], []
    for i in range(n_single):
        shape, color, pattern = triples[i % len(triples)]
        obj = Obj(shape, color, pattern, rng.choice(list(POSITIONS)), rng.choice(list(SIZES)))
        scene = Scene(rng.choice(list(BACKGROUNDS)), (obj,))
        single.append(EvalPrompt(caption(scene), scene))
    for i in range(n_double):
        a, b = rng.sample(triples, 2)
        objs = (Obj(*a, position="left", size="medium"), Obj(*b, position="right", size="medium"))
        scene = Scene(rng.choice(list(BACKGROUNDS)), objs)
        double.append(EvalPrompt(caption(scene), scene))
    return single, double


def eval_seeds(n: int = 2, split: str = "test") -> list[int]:
    return [(EVAL_SEED_BASE if split == "test" else TUNE_SEED_BASE) + k for k in range(n)]
