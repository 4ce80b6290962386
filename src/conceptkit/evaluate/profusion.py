"""`conceptkit evaluate profusion`: does ProFusion keep one image's detail while following the prompt?

Test objects: 8 held-out (shape, colour, pattern) combinations (picked from HELD_OUT_TRIPLES for variety), which the
shipped PromptNet never saw in pre-training; one image each (large, centred, gray background). Prompts: the five
compositional prompts of `evaluate ti` (each asks for a size, a position and a background) with S* for the object;
held-out seeds EVAL_SEED_BASE + k. The oracle scores
- preservation: the (largest) object has the test object's shape, colour and pattern (all three);
- adherence: the fraction of requested attributes (background, position, size) the image has.
Methods: `fusion` (fine-tuned PromptNet, fusion sampling with the PromptNet's recommended settings, see
`profusion.sampling.recommended_fusion`), `fusion_notebook` (the same with the notebook's fusion call, §3.7), `plain` (fine-tuned,
plain sampling), `pretrained` (the pre-trained PromptNet without fine-tuning, fusion sampling), `pretrained_plain`,
and `ti` (Textual Inversion on the same single image, its default recipe, DDIM with CFG 7.5).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from ..generate.images import generate
from ..generate.infotext import Settings, rendered, save_png
from ..learn.promptnet import finetune_promptnet
from ..learn.promptnet_config import FinetuneConfig
from ..learn.textual_inversion import learn_textual_inversion
from ..learn.ti_config import TIConfig
from ..models.loading import bundled_promptnet_path, load_pipeline
from ..profusion.sampling import FusionConfig, generate_profusion, recommended_fusion
from ..profusion.saved import load_promptnet
from ..shapes.render import render
from ..shapes.world import EVAL_SEED_BASE, HELD_OUT_TRIPLES, Obj, Scene
from .ti import COMPOSITIONAL

METHODS = ("fusion", "fusion_notebook", "plain", "pretrained", "pretrained_plain", "ti")
FINETUNED = ("fusion", "fusion_notebook", "plain")


def _diverse(triples, n: int) -> tuple:
    """n triples picked greedily so shapes, colours and patterns repeat as little as possible (deterministic)."""
    picked, pool = [], list(triples)
    while len(picked) < n and pool:
        def repeats(t):
            return sum(sum(p[i] == t[i] for p in picked) for i in range(3))
        best = min(pool, key=repeats)
        picked.append(best)
        pool.remove(best)
    return tuple(picked)


TEST_TRIPLES = _diverse(HELD_OUT_TRIPLES, 8)
# For choosing settings without touching the test set: four objects PromptNet did see in pre-training, and seeds
# of their own. The figures in the README come from the test split only.
TUNE_TRIPLES = (("square", "orange", "dotted"), ("triangle", "blue", "plain"), ("diamond", "pink", "checkered"),
                ("cross", "green", "striped"))
TUNE_SEED_BASE = EVAL_SEED_BASE + 500_000


def test_scene(triple: tuple[str, str, str]) -> Scene:
    return Scene("gray", (Obj(*triple, position="center", size="large"),), ((0, 0),))


def score(image, triple, requested: dict[str, str]) -> dict:
    from ..shapes import oracle

    reading = oracle.read(image)
    obj = max(reading.objects, key=lambda o: o.area) if reading.objects else None
    row = {"preservation": obj is not None and (obj.shape, obj.color, obj.pattern) == tuple(triple)}
    for i, attr in enumerate(("shape", "color", "pattern")):
        row[f"kept_{attr}"] = obj is not None and getattr(obj, attr) == triple[i]
    for attr, want in requested.items():
        row[attr] = (reading.background if attr == "background" else getattr(obj, attr, None)) == want
    return row


def summarise(rows: list[dict]) -> dict:
    checks = [v for r in rows for k, v in r.items() if k in ("background", "position", "size")]
    out = {"preservation": sum(r["preservation"] for r in rows) / len(rows), "adherence": sum(checks) / len(checks)}
    for attr in ("shape", "color", "pattern"):
        out[f"preservation_{attr}"] = sum(r[f"kept_{attr}"] for r in rows) / len(rows)
    for attr in ("background", "position", "size"):
        out[f"adherence_{attr}"] = sum(r[attr] for r in rows) / len(rows)
    return out


def evaluate_profusion(model: str = "toy", promptnet: str | Path | None = None, *, methods=METHODS, seeds: int = 4,
                       steps: int = 50, finetune: FinetuneConfig | None = None, fusion: FusionConfig | None = None,
                       fusion_overrides: dict | None = None,
                       ti: TIConfig | None = None, objects: int = len(TEST_TRIPLES), split: str = "test",
                       out_dir: str | Path = "outputs/evaluate-profusion", progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    triples, seed0 = (TEST_TRIPLES, EVAL_SEED_BASE) if split == "test" else (TUNE_TRIPLES, TUNE_SEED_BASE)
    finetune = finetune or FinetuneConfig()
    ti = ti or TIConfig()
    pipe = load_pipeline(model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pretrained = load_promptnet(promptnet or bundled_promptnet_path(model), pipe)
    fusion = replace(fusion or recommended_fusion(pretrained), **(fusion_overrides or {}), steps=steps)
    notebook = FusionConfig(steps=steps, class_word=fusion.class_word)
    plain = FusionConfig.plain(steps=steps, class_word=fusion.class_word)
    prompts = [t.format("S*") for t, _ in COMPOSITIONAL]
    requested = [r for _, r in COMPOSITIONAL for _ in range(seeds)]
    rows = {m: [] for m in methods}
    seconds = {m: 0.0 for m in methods}
    finetune_seconds, per_object, showcase = [], {}, []
    for triple in triples[:objects]:
        name = "-".join((triple[1], triple[2], triple[0]))
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        reference_path = folder / "reference.png"
        save_png(Image.fromarray(render(test_scene(triple))), reference_path, rendered(test_scene(triple)))
        reference = torch.from_numpy(render(test_scene(triple))).permute(2, 0, 1)[None].float() / 127.5 - 1
        if reference.shape[-1] != size:
            reference = torch.nn.functional.interpolate(reference, size=(size, size), mode="bicubic")
        here, images = {}, {}
        tuned = None
        if set(FINETUNED) & set(methods):
            t0 = time.perf_counter()
            finetune_promptnet(pipe, pretrained, reference_path, folder / "promptnet", finetune, model_name=model,
                               progress=False)
            finetune_seconds.append(time.perf_counter() - t0)
            tuned = load_promptnet(folder / "promptnet", pipe)
        for method in methods:
            t0 = time.perf_counter()
            if method == "ti":
                (folder / "ti-image").mkdir(exist_ok=True)
                save_png(Image.fromarray(render(test_scene(triple))), folder / "ti-image" / "0.png",
                         rendered(test_scene(triple)))
                token = f"<{name}>"
                run = replace(ti, token=token, validation_prompts=())
                fresh = load_pipeline(model)
                train_start = time.perf_counter()
                learn_textual_inversion(fresh, folder / "ti-image", folder / "ti", run, model_name=model,
                                        progress=False)
                t0 += time.perf_counter() - train_start  # seconds = generation only, as for the others
                result = generate(fresh, [p.replace("S*", token) for p in prompts], seed=seed0,
                                  num_images=seeds, steps=steps, guidance_scale=7.5, progress=False,
                                  out_dir=folder / method)
            else:
                saved = tuned if method in FINETUNED else pretrained
                cfg = {"fusion": fusion, "pretrained": fusion, "fusion_notebook": notebook}.get(method, plain)
                result = generate_profusion(pipe, saved, reference, prompts, cfg, seed=seed0,
                                            num_images=seeds, batch_size=len(prompts) * seeds, progress=False,
                                            out_dir=folder / method)
            seconds[method] += time.perf_counter() - t0
            here[method] = [score(im, triple, r) for im, r in zip(result.images, requested)]
            rows[method] += here[method]
            images[method] = result.images
        per_object[name] = {m: summarise(here[m]) for m in methods}
        showcase.append((reference_path, images))
        if progress:
            print(name + ": " + " | ".join(f"{m} {per_object[name][m]['preservation']:.2f}/"
                                          f"{per_object[name][m]['adherence']:.2f}" for m in methods), flush=True)
    n_images = len(prompts) * seeds * len(per_object)
    results = {}
    for m in methods:
        for k, v in summarise(rows[m]).items():
            results[f"{m}.{k}"] = round(v, 4)
        results[f"{m}.seconds"] = round(seconds[m] / n_images, 3)
    if finetune_seconds:
        results["finetune_seconds"] = round(sum(finetune_seconds) / len(finetune_seconds), 1)
    results["objects"] = per_object
    results["settings"] = {"model": model, "promptnet": str(pretrained.folder), "steps": steps,
                           "split": split, "seeds": [seed0 + k for k in range(seeds)], "prompts": prompts,
                           "fusion": fusion.__dict__, "fusion_notebook": notebook.__dict__, "plain": plain.__dict__, "finetune": finetune.__dict__,
                           "ti": {k: v for k, v in ti.__dict__.items() if k != "token"}, "threads": torch.get_num_threads()}
    write_showcase(showcase, [m for m in ("fusion", "plain") if m in methods] or list(methods)[:1], seeds,
                   out_dir / "grid.png", Settings(prompt="", steps=steps, sampler="ddim", seed=seed0, model=model))
    return results


def write_showcase(rows, methods: list[str], seeds: int, path: Path, settings: Settings | None = None,
                   scale: int = 2) -> Path:
    """One row per test object: the reference, then each prompt (first seed) for each of `methods`."""
    n = len(COMPOSITIONAL)
    cell = 64 * scale
    width = cell + len(methods) * (8 + n * cell)
    grid = Image.new("RGB", (width, cell * len(rows)), (255, 255, 255))
    for r, (reference, images) in enumerate(rows):
        grid.paste(Image.open(reference).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (0, r * cell))
        for j, m in enumerate(methods):
            for k in range(n):
                x = cell + j * (8 + n * cell) + 8 + k * cell
                grid.paste(images[m][k * seeds].convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                           (x, r * cell))
    save_png(grid, path, replace(settings or Settings(prompt=""), width=grid.width, height=grid.height,
                                 prompt=f"evaluate profusion: per test object, its reference, then each of "
                                        f"{', '.join(methods)} on the compositional prompts (first seed)"))
    return path


def table(results: dict) -> str:
    names = {"fusion": "fusion sampling (fine-tuned)", "fusion_notebook": "fusion sampling, notebook settings (fine-tuned)",
             "plain": "plain sampling (fine-tuned)",
             "pretrained": "pre-trained, no fine-tuning (fusion)", "pretrained_plain": "pre-trained, no fine-tuning (plain)",
             "ti": "Textual Inversion on the one image"}
    lines = ["| method | preservation | (shape / colour / pattern) | adherence | background | position | size | sum | "
             "s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        if f"{m}.preservation" not in results:
            continue
        r = {k.split(".", 1)[1]: v for k, v in results.items() if k.startswith(f"{m}.")}
        lines.append(f"| {names[m]} | {r['preservation']:.3f} | {r['preservation_shape']:.2f} / "
                     f"{r['preservation_color']:.2f} / {r['preservation_pattern']:.2f} | {r['adherence']:.3f} | "
                     f"{r['adherence_background']:.3f} "
                     f"| {r['adherence_position']:.3f} | {r['adherence_size']:.3f} | "
                     f"{r['preservation'] + r['adherence']:.3f} | {r['seconds']:.2f} |")
    return "\n".join(lines)
