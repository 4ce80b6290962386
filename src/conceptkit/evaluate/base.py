"""`conceptkit evaluate base`: how well a model draws what held-out prompts ask for, read back by the oracle.

single.{shape,color,pattern,position,background}: fraction of single-object images whose (largest) object has
the requested attribute (an image with no object counts as wrong for every object attribute).
double.both_present: the oracle sees two objects; double.both_shapes_correct: the left and the right object each
have the requested shape.
single.shape_small / single.shape_large: single.shape split by the requested size (every v4 miss was a small object
drawn rounded, e.g. a diamond read as a circle; the VAE's reconstructions of small objects read right 0.99).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..files import atomic_write_text
from ..generate.images import generate
from ..shapes import oracle
from .prompts import base_prompts, eval_seeds

SINGLE_KEYS = ("shape", "color", "pattern", "position", "background")
DOUBLE_KEYS = ("both_present", "both_shapes_correct", "both_colors_correct")


def score_single(image, scene) -> dict[str, bool]:
    reading = oracle.read(image)
    want = scene.objects[0]
    scores = {"background": reading.background == scene.background}
    got = max(reading.objects, key=lambda o: o.area) if reading.objects else None
    for key in ("shape", "color", "pattern", "position"):
        scores[key] = got is not None and getattr(got, key) == getattr(want, key)
    scores[f"shape_{want.size}"] = scores["shape"]
    return scores


def score_double(image, scene) -> dict[str, bool]:
    reading = oracle.read(image)
    present = reading.count == 2
    left, right = scene.objects
    ok = lambda attr: present and all(  # noqa: E731
        getattr(g, attr) == getattr(w, attr) for g, w in zip(reading.objects, (left, right))
    )
    return {"both_present": present, "both_shapes_correct": ok("shape"), "both_colors_correct": ok("color")}


def _mean(rows: list[dict[str, bool]], keys) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


def summarise(rows: list[dict[str, bool]], keys) -> dict[str, float]:
    """The mean of each key in `keys` over all rows, and of every other key (the per-size splits) over the rows
    that have it."""
    out = {k: round(v, 4) for k, v in _mean(rows, keys).items()}
    for key in sorted({k for r in rows for k in r} - set(keys)):
        having = [r[key] for r in rows if key in r]
        out[key] = round(sum(having) / len(having), 4)
    return out


def evaluate_base(pipe, *, seeds: int = 2, steps: int = 30, guidance_scale: float = 7.5, scheduler: str = "ddim",
                  n_single: int = 64, n_double: int = 32, image_dir: str | Path | None = None,
                  progress: bool = True, procs=None, split: str = "test") -> dict:
    """procs (learn/distributed.Processes): split every generate() call's prompts over several processes (each
    gets all images back, so every process scores them and returns the same results)."""
    single, double = base_prompts(n_single, n_double, split)
    t0 = time.time()
    results = {}
    for name, prompts, score, keys in (("single", single, score_single, SINGLE_KEYS),
                                       ("double", double, score_double, DOUBLE_KEYS)):
        rows = []
        for k, seed in enumerate(eval_seeds(seeds, split)):
            out = generate(pipe, [p.text for p in prompts], seed=seed, num_images=1, steps=steps,
                           guidance_scale=guidance_scale, scheduler=scheduler, progress=progress,
                           out_dir=Path(image_dir) / f"{name}-seed{seed}" if image_dir else None, procs=procs)
            rows += [score(img, p.scene) for img, p in zip(out.images, prompts)]
        for key, value in summarise(rows, keys).items():
            results[f"{name}.{key}"] = value
        results[f"{name}.images"] = len(rows)
    results["seconds"] = round(time.time() - t0, 1)
    results["settings"] = {"split": split, "seeds": eval_seeds(seeds, split), "steps": steps, "guidance_scale": guidance_scale,
                           "scheduler": scheduler}
    return results


TARGETS = {  # the lab-model v4 issue's targets
    "single.shape": 0.95, "single.color": 0.95, "single.background": 0.98, "single.position": 0.92,
    "single.pattern": 0.90, "double.both_present": 0.70, "double.both_shapes_correct": 0.85,
    "double.both_colors_correct": 0.80,
}


def table(results: dict) -> str:
    lines = ["| metric | value | target |", "|---|---|---|"]
    for key, value in results.items():
        if isinstance(value, float) and key != "seconds":
            target = TARGETS.get(key)
            lines.append(f"| {key} | {value:.3f} | {'≥ %.2f' % target if target else ''} |")
    return "\n".join(lines)


def write_json(results: dict, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
