"""Datasets of shapes-world scenes: render them in memory, or write them as an image folder with captions."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from ..generate.infotext import rendered, save_png
from .captions import caption
from .render import render
from .world import (BACKGROUNDS, COLORS, EVAL_SEED_BASE, JITTER, PATTERNS, SHAPES, Obj, Scene, is_held_out,
                    sample_scene)


def scenes(n: int, seed: int = 0, held_out: bool = False, p_pair: float = 0.4) -> list[Scene]:
    """n scenes drawn from one seed. Training uses seeds below EVAL_SEED_BASE; evaluation seeds start there."""
    if not held_out and seed >= EVAL_SEED_BASE:
        raise ValueError(f"training seeds must be below {EVAL_SEED_BASE} (held-out seeds start there)")
    rng = random.Random(seed)
    return [sample_scene(rng, p_pair=p_pair, held_out=held_out) for _ in range(n)]


def reference_pairs(items: list[Scene], n: int, seed: int = 0) -> list[tuple[Scene, int, int]]:
    """n two-object scenes, each holding the object of one of the one-object `items` (its shape, colour and
    pattern; a random side and background) beside a second object whose shape, colour and pattern all differ from
    it (a training triple): (scene, index of that object in the scene, index of its item). PromptNet pre-training
    reads the item and denoises the pair scene, so S* meets a second object's words (learn/promptnet.py)."""
    rng = random.Random(f"reference-pairs-{seed}")
    singles = [i for i, s in enumerate(items) if len(s.objects) == 1]
    if not singles:
        raise ValueError("reference pairs need one-object scenes to take their objects from")
    out = []
    for _ in range(n):
        k = rng.choice(singles)
        mine = items[k].objects[0]
        while True:
            second = (rng.choice([x for x in SHAPES if x != mine.shape]),
                      rng.choice([x for x in COLORS if x != mine.color]),
                      rng.choice([x for x in PATTERNS if x != mine.pattern]))
            if not is_held_out(Obj(*second, "left", "medium")):
                break
        which = rng.randrange(2)  # the side (and index) of the reference's object
        sides = ("left", "right") if which == 0 else ("right", "left")
        placed, other = Obj(*mine.triple, sides[0], "medium"), Obj(*second, sides[1], "medium")
        objs = (placed, other) if which == 0 else (other, placed)
        offsets = tuple((rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)) for _ in objs)
        out.append((Scene(rng.choice(list(BACKGROUNDS)), objs, offsets), which, k))
    return out


def render_all(items: list[Scene]) -> np.ndarray:
    """(N, 64, 64, 3) uint8."""
    return np.stack([render(s) for s in items])


def write_image_folder(out: str | Path, items: list[Scene], seed: int = 0,
                       pairs: list[tuple[Scene, int, int]] = ()) -> Path:
    """PNG files plus metadata.jsonl (file_name, text, scene): the layout of an 'imagefolder' dataset. `pairs`
    (reference_pairs) follow the items, their lines naming the object S* stands for ("placeholder") and the item's
    file as their "reference"."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i, s in enumerate(items):
        name = f"{i:06d}.png"
        save_png(Image.fromarray(render(s)), out / name, rendered(s))
        lines.append(json.dumps({"file_name": name, "text": caption(s, rng), "scene": s.to_dict()}))
    for j, (s, which, k) in enumerate(pairs, start=len(items)):
        name = f"{j:06d}.png"
        save_png(Image.fromarray(render(s)), out / name, rendered(s))
        lines.append(json.dumps({"file_name": name, "text": caption(s, rng), "scene": s.to_dict(),
                                 "placeholder": which, "reference": f"{k:06d}.png"}))
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "metadata.jsonl")
    return out
