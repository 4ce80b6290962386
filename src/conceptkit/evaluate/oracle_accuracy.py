"""How often the oracle reads scenes correctly: on clean renders, and on a VAE's reconstructions of them.

Per-attribute accuracy over objects (matched left to right) of scenes drawn with held-out seeds.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from ..shapes import oracle
from ..shapes.render import render
from ..shapes.world import EVAL_SEED_BASE, POSITIONS, sample_scene

ATTRS = ("shape", "color", "pattern", "position")


def score(images: list[np.ndarray], scenes) -> dict[str, float]:
    hits = {k: 0 for k in ("background", "count", *ATTRS)}
    n_obj = 0
    for img, scene in zip(images, scenes):
        reading = oracle.read(img)
        hits["background"] += reading.background == scene.background
        hits["count"] += reading.count == len(scene.objects)
        offsets = scene.offsets or [(0, 0)] * len(scene.objects)
        want = [o for o, _ in sorted(zip(scene.objects, offsets), key=lambda t: POSITIONS[t[0].position][0] + t[1][0])]
        n_obj += len(want)
        if reading.count != len(want):
            continue
        for w, g in zip(want, reading.objects):
            for a in ATTRS:
                hits[a] += getattr(w, a) == getattr(g, a)
    n = len(images)
    return {k: round(v / (n if k in ("background", "count") else n_obj), 4) for k, v in hits.items()}


def test_scenes(n: int):
    rng = random.Random(EVAL_SEED_BASE + 7)
    return [sample_scene(rng) for _ in range(n)]


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch: int = 128) -> list[np.ndarray]:
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float().to(vae.device, vae.dtype) / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        rec = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        out.extend(rec)
    return out


def oracle_accuracy(n: int = 1000, vae=None) -> dict:
    scenes = test_scenes(n)
    clean = np.stack([render(s) for s in scenes])
    result = {"scenes": n, "clean": score(list(clean), scenes)}
    if vae is not None:
        result["vae"] = score(reconstruct(vae, clean), scenes)
    return result


def table(results: dict) -> str:
    vae = "vae" in results
    lines = ["| attribute | clean renders |" + (" VAE reconstructions |" if vae else ""), "|---|---|" + ("---|" if vae else "")]
    for key in results["clean"]:
        lines.append(f"| {key} | {results['clean'][key]:.3f} |" + (f" {results['vae'][key]:.3f} |" if vae else ""))
    return "\n".join(lines)
