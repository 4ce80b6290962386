"""`conceptkit evaluate clora`: compose two concept LoRAs in one image; does each object keep its own concept?

Concept LoRAs: one per bundled concept set (a shape with a colour and a pattern), trained DreamBooth-style with a
trigger word and per-image captions that name the view ("a large zwx object in the center, on a gray background").
The LoRAs shipped in `bundled/loras/` were made by this module's `train_concept_loras`.

Prompts: every pair of concepts, "a {A} on the left and a {B} on the right, on a <bg> background" (two-object
scenes; the LoRAs only ever saw single objects), at held-out seeds. An image is a **success** when the oracle
finds two objects and they can be matched one-to-one to the two concepts with shape, colour and pattern all equal
(nothing missing, swapped or blended).
"""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import conceptkit

from ..compose.config import CLoRAConfig
from ..compose.run import LoraSpec, compose
from ..files import atomic_write_text
from ..shapes import oracle
from ..shapes.captions import POSITION_PHRASES, shape_word
from ..shapes.concepts import CONCEPTS, VIEWS, Concept, concept_folder
from ..shapes.world import EVAL_SEED_BASE

# The bundled tokenizer has no rare words: an unknown word splits into byte pieces whose maps are diffuse, and
# a concept's mask is the OR over its tokens' maps. Single letters are single, untrained tokens.
TRIGGERS = {"red-striped-star": "z", "cyan-dotted-moon": "q", "pink-checkered-cross": "j",
            "purple-dotted-diamond": "v"}
BACKGROUNDS = ("gray", "white", "navy", "teal", "brown", "gray")
TEMPLATE = "a {{{a}}} on the left and a {{{b}}} on the right, on a {bg} background"
METHODS = ("clora", "reference", "merge", "switch", "composite", "none")
EVAL_SEEDS = tuple(EVAL_SEED_BASE + 7000 + i for i in range(8))  # held out: tuning used EVAL_SEED_BASE + 9000 + i
TUNING_SEEDS = tuple(EVAL_SEED_BASE + 9000 + i for i in range(4))


def bundled_loras_path() -> Path:
    return Path(conceptkit.__file__).parent / "bundled" / "loras"


def slot(concept: Concept) -> str:
    return concept.name.split("-")[-1]


def captions(concept: Concept) -> list[str]:
    trigger, noun = TRIGGERS[concept.name], shape_word(concept.shape)
    return [f"a {size} {trigger} {noun} {POSITION_PHRASES[pos]}, on a {bg} background" for bg, pos, size, _ in VIEWS]


def training_folder(concept: Concept, folder: Path) -> Path:
    """The concept's images with one caption file each (kohya convention: 0.png + 0.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, text) in enumerate(zip(sorted(concept_folder(concept).glob("*.png")), captions(concept))):
        shutil.copyfile(image, folder / f"{i}.png")
        atomic_write_text(folder / f"{i}.txt", text + "\n")
    return folder


def train_concept_loras(pipe, out_dir: Path, model_name: str = "toy", progress: bool = True, **overrides) -> dict:
    """Train (or resume) one LoRA per bundled concept into out_dir/<name>/; returns {name: LoRA file}."""
    from ..learn.lora import learn_lora
    from ..learn.lora_config import LoRAConfig

    paths = {}
    for concept in CONCEPTS:
        run = out_dir / concept.name
        final = run / "pytorch_lora_weights.safetensors"
        if not final.exists():
            cfg = LoRAConfig(trigger=TRIGGERS[concept.name], class_word=shape_word(concept.shape), **overrides)
            images = training_folder(concept, out_dir / "images" / concept.name)
            learn_lora(pipe, images, run, cfg, model_name=model_name, resume=run.exists(), progress=progress)
        paths[concept.name] = final
    return paths


def concepts_found(image, a: Concept, b: Concept) -> tuple[int, bool]:
    """(how many of the two concepts appear as an object with all three attributes right, success)."""
    objects = oracle.read(image).objects
    got = [(o.shape, o.color, o.pattern) for o in objects]
    want = [(c.shape, c.color, c.pattern) for c in (a, b)]
    found = sum(1 for w in want if w in got) if want[0] != want[1] else min(2, got.count(want[0]))
    return found, len(objects) == 2 and sorted(got) == sorted(want)


def success(image, a: Concept, b: Concept) -> bool:
    return concepts_found(image, a, b)[1]


def summarise(reads: list[tuple[int, bool]]) -> dict:
    """success: the share of images that succeed; concepts_found: the share of the concepts (two per image) that
    appear with all three attributes right (partial credit). `reads` are concepts_found() results."""
    return {"success": sum(ok for _, ok in reads) / len(reads),
            "concepts_found": sum(found for found, _ in reads) / (2 * len(reads))}


def pairs() -> list[tuple[Concept, Concept, str]]:
    return [(a, b, BACKGROUNDS[i % len(BACKGROUNDS)]) for i, (a, b) in enumerate(itertools.combinations(CONCEPTS, 2))]


def lora_files(folder: Path | None) -> dict[str, Path]:
    folder = folder or bundled_loras_path()
    return {c.name: (folder / f"{c.name}.safetensors") if (folder / f"{c.name}.safetensors").exists()
            else folder / c.name / "pytorch_lora_weights.safetensors" for c in CONCEPTS}


def evaluate_clora(pipe, cfg: CLoRAConfig, *, methods=METHODS, seeds=EVAL_SEEDS, loras: Path | None = None,
                   out_dir: Path | None = None, progress: bool = True) -> dict:
    files = lora_files(loras)
    results: dict[str, dict] = {m: {"reads": [], "seconds": 0.0} for m in methods}
    per_pair = []
    for a, b, bg in pairs():
        template = TEMPLATE.format(a=slot(a), b=slot(b), bg=bg)
        specs = [LoraSpec(slot(c), str(files[c.name])) for c in (a, b)]
        composed = compose(pipe, template, specs, methods=list(methods), seeds=list(seeds), cfg=cfg,
                           out_dir=None if out_dir is None else out_dir / f"{slot(a)}-{slot(b)}")
        row = {"template": template}
        for m in methods:
            reads = [concepts_found(image, a, b) for image in composed.images[m]]
            results[m]["reads"] += reads
            results[m]["seconds"] += composed.seconds[m] * len(reads)
            row[m] = summarise(reads)["success"]
        per_pair.append(row)
        if progress:
            print(json.dumps(row), flush=True)
        unload_concepts(pipe)
    out = {}
    for m, r in results.items():
        for k, v in summarise(r["reads"]).items():
            out[f"{m}.{k}"] = round(v, 4)
        out[f"{m}.seconds_per_image"] = round(r["seconds"] / len(r["reads"]), 3)
    out["images_per_method"] = len(results[methods[0]]["reads"])
    single = single_lora_fidelity(pipe, cfg, seeds=seeds, loras=loras)
    out["single_lora.fidelity"] = single["mean"]
    out["single_lora.per_concept"] = single
    out["pairs"] = per_pair
    out["settings"] = {"methods": list(methods), "seeds": list(seeds), "loras": str(loras) if loras else "bundled",
                       "compose": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}}
    return out


def single_lora_fidelity(pipe, cfg: CLoRAConfig, *, seeds=EVAL_SEEDS, loras: Path | None = None) -> dict:
    """The ceiling: each concept LoRA alone ("a {x} on the left, on a <bg> background"), how often the oracle
    reads the concept's shape, colour and pattern. A composition can only succeed as often as both of its LoRAs
    would alone."""
    files = lora_files(loras)
    out = {}
    for i, concept in enumerate(CONCEPTS):
        template = "a {x} on the left, on a " + BACKGROUNDS[i] + " background"
        composed = compose(pipe, template, [LoraSpec("x", str(files[concept.name]))], methods=["merge"],
                           seeds=list(seeds), cfg=cfg)
        hits = 0
        for image in composed.images["merge"]:
            objects = oracle.read(image).objects
            hits += any((o.shape, o.color, o.pattern) == (concept.shape, concept.color, concept.pattern)
                        for o in objects)
        out[concept.name] = round(hits / len(seeds), 4)
        unload_concepts(pipe)
    out["mean"] = round(sum(out.values()) / len(CONCEPTS), 4)
    return out


def unload_concepts(pipe) -> None:
    from ..models.lora import loaded_adapters

    if loaded_adapters(pipe):
        pipe.unload_lora_weights()


def table(result: dict, methods=METHODS) -> str:
    lines = ["| method | success | concepts found | seconds / image |", "|---|---|---|---|"]
    for m in methods:
        lines.append(f"| {m} | {result[f'{m}.success']:.3f} | {result[f'{m}.concepts_found']:.3f} | "
                     f"{result[f'{m}.seconds_per_image']:.2f} |")
    if "single_lora.fidelity" in result:
        lines.append(f"| (one LoRA alone, the ceiling) | — | {result['single_lora.fidelity']:.3f} | — |")
    return "\n".join(lines)
