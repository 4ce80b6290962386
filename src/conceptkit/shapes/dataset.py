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
from .world import EVAL_SEED_BASE, Scene, sample_scene


def scenes(n: int, seed: int = 0, held_out: bool = False, p_pair: float = 0.4) -> list[Scene]:
    """n scenes drawn from one seed. Training uses seeds below EVAL_SEED_BASE; evaluation seeds start there."""
    if not held_out and seed >= EVAL_SEED_BASE:
        raise ValueError(f"training seeds must be below {EVAL_SEED_BASE} (held-out seeds start there)")
    rng = random.Random(seed)
    return [sample_scene(rng, p_pair=p_pair, held_out=held_out) for _ in range(n)]


def render_all(items: list[Scene]) -> np.ndarray:
    """(N, 64, 64, 3) uint8."""
    return np.stack([render(s) for s in items])


def write_image_folder(out: str | Path, items: list[Scene], seed: int = 0) -> Path:
    """PNG files plus metadata.jsonl (file_name, text, scene): the layout of an 'imagefolder' dataset."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i, s in enumerate(items):
        name = f"{i:06d}.png"
        save_png(Image.fromarray(render(s)), out / name, rendered(s))
        lines.append(json.dumps({"file_name": name, "text": caption(s, rng), "scene": s.to_dict()}))
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "metadata.jsonl")
    return out
