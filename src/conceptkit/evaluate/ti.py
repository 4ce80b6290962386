"""`conceptkit evaluate ti`: does a learned word bring back its concept, and does it still obey the prompt?

For each bundled concept set: learn S* with the given recipe, then sample held-out seeds from "a photo of S*" and
from five compositional prompts that ask for a background, position and size the concept images never showed
together. The oracle scores
- fidelity: the (largest) object has the concept's shape, colour and pattern (all three), over every image;
- adherence: over the compositional images, the fraction of requested attributes (background, position, size)
  that the image has.
Baselines use the same prompts with S* replaced by the initializer word, and by the best plain-text description
the vocabulary allows ("red striped object": a star cannot be named).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from PIL import Image

from ..generate.images import generate
from ..generate.infotext import Settings, save_png
from ..learn.textual_inversion import learn_textual_inversion
from ..learn.ti_config import TIConfig
from ..models.loading import load_pipeline
from ..shapes import oracle
from ..shapes.concepts import CONCEPTS, Concept, concept_folder
from ..shapes.world import EVAL_SEED_BASE

PLAIN = "a photo of {}"
COMPOSITIONAL = (
    ("a large {} on the left, on a brown background", {"size": "large", "position": "left", "background": "brown"}),
    ("a small {} at the bottom, on a navy background", {"size": "small", "position": "bottom", "background": "navy"}),
    ("a large {} at the top, on a white background", {"size": "large", "position": "top", "background": "white"}),
    ("a small {} on the right, on a gray background", {"size": "small", "position": "right", "background": "gray"}),
    ("a small {} in the center, on a teal background", {"size": "small", "position": "center", "background": "teal"}),
)
PROMPTS = ((PLAIN, {}),) + COMPOSITIONAL  # (template, the attributes it requests): what every condition samples
CONDITIONS = ("ti", "init_word", "text")


def score(image, concept: Concept, requested: dict[str, str]) -> dict:
    reading = oracle.read(image)
    obj = max(reading.objects, key=lambda o: o.area) if reading.objects else None
    row = {"fidelity": obj is not None and (obj.shape, obj.color, obj.pattern) == (concept.shape, concept.color,
                                                                                   concept.pattern)}
    for attr, want in requested.items():
        got = reading.background if attr == "background" else getattr(obj, attr, None)
        row[attr] = got == want
    return row


def sample_and_score(pipe, concept: Concept, phrase: str, seeds: int, steps: int, guidance_scale: float,
                     out_dir: Path | None) -> list[dict]:
    prompts = list(PROMPTS)
    out = generate(pipe, [t.format(phrase) for t, _ in prompts], seed=EVAL_SEED_BASE, num_images=seeds, steps=steps,
                   guidance_scale=guidance_scale, progress=False, out_dir=out_dir)
    requested = [r for _, r in prompts for _ in range(seeds)]
    return [score(image, concept, r) for image, r in zip(out.images, requested)]


def summarise(rows: list[dict]) -> dict:
    fidelity = sum(r["fidelity"] for r in rows) / len(rows)
    checks = [v for r in rows for k, v in r.items() if k != "fidelity"]
    per_attr = {a: sum(r[a] for r in rows if a in r) / max(1, sum(a in r for r in rows))
                for a in ("background", "position", "size")}
    return {"fidelity": fidelity, "adherence": sum(checks) / len(checks), **{f"adherence_{a}": v
                                                                           for a, v in per_attr.items()}}


def evaluate_ti(model: str = "toy", cfg: TIConfig | None = None, *, concepts=CONCEPTS, seeds: int = 4,
                steps: int = 30, guidance_scale: float = 7.5, out_dir: str | Path = "outputs/evaluate-ti",
                progress: bool = True) -> dict:
    cfg = cfg or TIConfig()
    out_dir = Path(out_dir)
    per_concept, rows, seconds, showcase = {}, {c: [] for c in CONDITIONS}, [], []
    for concept in concepts:
        pipe = load_pipeline(model)
        token = f"<{concept.name}>"
        here = {}
        for condition, phrase in (("init_word", cfg.init_word or "object"), ("text", concept.description)):
            here[condition] = sample_and_score(pipe, concept, phrase, seeds, steps, guidance_scale,
                                               out_dir / concept.name / condition)
        t0 = time.perf_counter()
        run = TIConfig(**{**cfg.__dict__, "token": token})
        learn_textual_inversion(pipe, concept_folder(concept), out_dir / concept.name / "embedding", run,
                                model_name=model, progress=progress)
        seconds.append(time.perf_counter() - t0)
        here["ti"] = sample_and_score(pipe, concept, token, seeds, steps, guidance_scale, out_dir / concept.name / "ti")
        per_concept[concept.name] = {c: summarise(here[c]) for c in CONDITIONS}
        per_concept[concept.name]["seconds"] = round(seconds[-1], 1)
        for c in CONDITIONS:
            rows[c] += here[c]
        showcase.append((concept, out_dir / concept.name / "ti"))
        if progress:
            r = per_concept[concept.name]
            print(f"{concept.name}: ti fidelity {r['ti']['fidelity']:.3f} adherence {r['ti']['adherence']:.3f} | "
                  f"init {r['init_word']['fidelity']:.3f} | text {r['text']['fidelity']:.3f} | {seconds[-1]:.0f} s")
    results = {}
    for c in CONDITIONS:
        for k, v in summarise(rows[c]).items():
            results[f"{c}.{k}"] = round(v, 4)
    results["seconds_per_concept"] = round(sum(seconds) / len(seconds), 1)
    results["concepts"] = per_concept
    results["settings"] = {"model": model, "seeds": [EVAL_SEED_BASE + k for k in range(seeds)], "steps": steps,
                           "guidance_scale": guidance_scale, "recipe": {k: v for k, v in cfg.__dict__.items()
                                                                        if k != "token"}}
    write_showcase(showcase, seeds, out_dir / "grid.png",
                   Settings(prompt="", steps=steps, sampler="ddim", cfg_scale=guidance_scale, seed=EVAL_SEED_BASE,
                            model=model))
    return results


def write_showcase(rows: list[tuple[Concept, Path]], seeds: int, path: Path, settings: Settings | None = None,
                   scale: int = 2) -> Path:
    """One row per concept: a training image, then 'a photo of S*' and each compositional prompt (first seed)."""
    cells = 1 + 1 + len(COMPOSITIONAL)
    grid = Image.new("RGB", (64 * cells * scale + 8, 64 * len(rows) * scale), (255, 255, 255))
    for r, (concept, folder) in enumerate(rows):
        images = sorted(folder.glob("*.png"))
        picks = [concept.images()[0]] + [Image.open(images[k * seeds]) for k in range(cells - 1)]
        for c, image in enumerate(picks):
            x = c * 64 * scale + (8 if c else 0)
            grid.paste(image.convert("RGB").resize((64 * scale, 64 * scale), Image.Resampling.NEAREST),
                       (x, r * 64 * scale))
    settings = replace(settings or Settings(prompt=""), width=grid.width, height=grid.height,
                       prompt="evaluate ti: per concept, a training image, then 'a photo of S*' and each "
                              "compositional prompt (first seed)")
    save_png(grid, path, settings)
    return path


def table(results: dict) -> str:
    lines = ["| concept | TI fidelity | TI adherence | init-word fidelity | text fidelity | text adherence | s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["concepts"].items():
        lines.append(f"| {name} | {r['ti']['fidelity']:.3f} | {r['ti']['adherence']:.3f} | "
                     f"{r['init_word']['fidelity']:.3f} | {r['text']['fidelity']:.3f} | "
                     f"{r['text']['adherence']:.3f} | {r['seconds']:.0f} |")
    lines.append(f"| **all** | **{results['ti.fidelity']:.3f}** | **{results['ti.adherence']:.3f}** | "
                 f"**{results['init_word.fidelity']:.3f}** | **{results['text.fidelity']:.3f}** | "
                 f"**{results['text.adherence']:.3f}** | {results['seconds_per_concept']:.0f} |")
    return "\n".join(lines)
