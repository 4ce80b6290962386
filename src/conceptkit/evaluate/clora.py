"""`conceptkit evaluate clora`: two concept LoRAs in one image; does each object keep its own attributes?

CLoRA's claim is that with several LoRAs active each concept keeps its own attributes, where merging the LoRAs mixes
them. The benchmark measures exactly that on the shapes world:

- **Concepts** (shapes/concepts.py COMPOSE_TUNE, COMPOSE_TEST): four per split, named shapes (each concept has its
  own class word), pairwise different in shape, colour and pattern, all held-out triples (the base model never saw
  them). The tune concepts and seeds choose the LoRA recipe and the CLoRA settings; figures are reported on test.
- **Concept LoRAs** (`train_concept_loras`, recipe `Recipe`): pivotal tuning, the trigger `<z>` first learned as a
  word by Textual Inversion on single-object views, then the LoRA trained with that word fixed on rendered scenes
  captioned in the form they are used in, "a <z> circle on the left and a square on the right, on a gray background"
  (the other object a plain class word, any shape, colour and pattern but the concept's), plus single-object views;
  the word is bundled into the LoRA file.
- **Cases**: every pair of a split's concepts, the first-named one on the left ("a {A} on the left and a {B} on
  the right, …") and on the right ("a {A} on the right and a {B} on the left, …"), on two backgrounds, at 8 seeds:
  6 × 2 × 2 × 8 = 192 images per method.
- **Success**: the oracle reads exactly two objects, and the left one has the left concept's shape, colour and
  pattern and the right one the right concept's. Position counts: the prompt says where each concept goes, and the
  base model places objects right (evaluate base: position 1.000). `success_any_side` drops the position
  requirement; `concepts_found` is partial credit (the share of the two concepts present anywhere with all three
  attributes); `mixed` is the share of images with an object of one concept's shape wearing the other concept's
  colour or pattern (the attribute mixing CLoRA claims to prevent).
- **Methods**: clora, merge, switch, composite, none (class words only), text (both concepts written out in words,
  no LoRA: the base model's own binding) and regional (each LoRA's branch confined to the half of the image its
  concept is asked for: the layout given, an upper reference for CLoRA's attention masks).
- **Single-LoRA fidelity** (the ceiling): each LoRA alone in the same cases, the other slot a plain class word;
  a hit is the concept's shape, colour and pattern on its side.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import conceptkit

from ..compose.config import CLoRAConfig
from ..compose.run import LoraSpec, compose
from ..files import atomic_write, atomic_write_text
from ..shapes import oracle
from ..shapes.captions import POSITION_PHRASES, shape_word
from ..shapes.concepts import COMPOSE_TEST, COMPOSE_TUNE, VIEWS, Concept
from ..shapes.world import (BACKGROUNDS as WORLD_BACKGROUNDS, COLORS, EVAL_SEED_BASE, JITTER, NAMED_SHAPES, PATTERNS,
                            Obj, Scene, is_held_out)
from .prompts import TUNE_SEED_BASE

# Single letters: single tokens of the bundled tokenizer that no caption uses ('a' is a word), so untrained. A
# made-up word would split into byte pieces whose maps are diffuse (a concept's mask is the OR over its tokens).
TRIGGERS = {"blue-checkered-diamond": "k", "green-striped-circle": "w", "orange-dotted-triangle": "x",
            "purple-plain-cross": "y",
            "yellow-checkered-circle": "z", "blue-plain-square": "q", "red-striped-triangle": "j",
            "pink-dotted-cross": "v"}
SPLITS = {"tune": COMPOSE_TUNE, "test": COMPOSE_TEST}
SPLIT_BACKGROUNDS = {"tune": ("navy", "teal"), "test": ("gray", "white")}
SPLIT_SEEDS = {"tune": tuple(TUNE_SEED_BASE + 7000 + i for i in range(8)),
               "test": tuple(EVAL_SEED_BASE + 7000 + i for i in range(8))}
EVAL_SEEDS, TUNING_SEEDS = SPLIT_SEEDS["test"], SPLIT_SEEDS["tune"]
SIDES = ("left", "right")
METHODS = ("clora", "merge", "switch", "composite", "none", "text", "regional")


def bundled_loras_path() -> Path:
    """The bundled LoRAs: the composition concepts' (this benchmark's) and the four older concept-set LoRAs."""
    return Path(conceptkit.__file__).parent / "bundled" / "loras"


def slot(concept: Concept) -> str:
    return concept.shape  # unique within a split


def split_of(concept: Concept) -> str:
    return next(s for s, cs in SPLITS.items() if concept in cs)


# ---------------------------------------------------------------------------------------------------------------
# Cases and scoring
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    first: Concept  # named first in the prompt
    second: Concept
    first_side: str  # where the first-named concept is asked for
    background: str

    @property
    def second_side(self) -> str:
        return "right" if self.first_side == "left" else "left"

    @property
    def left(self) -> Concept:
        return self.first if self.first_side == "left" else self.second

    @property
    def right(self) -> Concept:
        return self.second if self.first_side == "left" else self.first

    def prompt(self, first: str, second: str) -> str:
        return (f"a {first} on the {self.first_side} and a {second} on the {self.second_side}, "
                f"on a {self.background} background")

    @property
    def template(self) -> str:
        return self.prompt(f"{{{slot(self.first)}}}", f"{{{slot(self.second)}}}")

    @property
    def regions(self) -> list[str]:
        return [self.first_side, self.second_side]

    @property
    def name(self) -> str:
        return f"{slot(self.left)}-{slot(self.right)}-{self.first_side}-first-{self.background}"


def cases(split: str = "test") -> list[Case]:
    """Every pair of the split's concepts x first-named concept on the left / on the right x two backgrounds."""
    return [Case(a, b, side, bg) for a, b in itertools.combinations(SPLITS[split], 2) for side in SIDES
            for bg in SPLIT_BACKGROUNDS[split]]


def triple(o) -> tuple[str, str, str]:
    return (o.shape, o.color, o.pattern)


@dataclass(frozen=True)
class PairReading:
    found: int  # how many of the two concepts appear (anywhere) with shape, colour and pattern right
    success: bool  # exactly two objects, the left concept's on the left and the right concept's on the right
    success_any_side: bool  # exactly two objects, the two concepts, either side
    mixed: bool  # an object of one concept's shape in the other concept's colour or pattern


def read_pair(image, left: Concept, right: Concept) -> PairReading:
    objects = oracle.read(image).objects  # left to right
    got = [triple(o) for o in objects]
    want = [triple(left), triple(right)]
    found = sum(1 for w in want if w in got)
    mixed = any(o.shape == a.shape and (o.color == b.color or o.pattern == b.pattern)
                for o in objects for a, b in ((left, right), (right, left)))
    return PairReading(found, len(got) == 2 and got == want, len(got) == 2 and sorted(got) == sorted(want), mixed)


def summarise(reads: list[PairReading]) -> dict:
    n = len(reads)
    return {"success": sum(r.success for r in reads) / n,
            "success_any_side": sum(r.success_any_side for r in reads) / n,
            "concepts_found": sum(r.found for r in reads) / (2 * n),
            "mixed": sum(r.mixed for r in reads) / n}


def on_side(image, concept: Concept, side: str) -> bool:
    """The concept (shape, colour, pattern) is drawn on that half of the image."""
    return any(triple(o) == triple(concept) and (o.centroid[0] < 32) == (side == "left")
               for o in oracle.read(image).objects)


# ---------------------------------------------------------------------------------------------------------------
# Concept LoRAs
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How a concept LoRA is trained, chosen on the tune concepts and seeds by single-LoRA fidelity (README,
    `evaluate clora`): 16 composed views with the text encoder, rank 4: 0.31; the text encoder off: 0.71 (one
    concept); 48 composed views: 0.78 (four concepts); rank 8: 0.87; trained on the VAE posterior's means: 0.94.
    More steps made colours worse every time (1,600 steps: 0.00, 0.50, 0.43). On all four backgrounds the means
    recipe held 0.815 (gray 0.75, white 0.63); the trigger learned first as a word (pivotal tuning): 0.93."""
    pair_views: int = 48  # two-object scenes captioned in the composed form
    single_views: int = 4  # one-object scenes (the concept-set views)
    steps: int = 800
    lr: float = 1e-3
    rank: int = 8
    batch: int = 4
    text_encoder: bool = False  # a text-encoder LoRA changes every word's encoding (the other slot's class word too)
    latents: str = "mean"  # the base UNet was trained on posterior means; samples add colour speckle
    seed: int = 0
    trigger_ti_steps: int = 600  # pivotal tuning: Textual Inversion steps for the trigger word first (0: a plain letter)
    trigger_ti_views: int = 16  # its images: one-object views of the concept
    trigger_init: str = "class"  # the word it starts from: the class word ("circle"), the colour word ("yellow"), or
    # the description ("yellow checkered circle": one vector per word, as AUTOMATIC1111's initialization text)
    backgrounds: tuple[str, ...] = tuple(WORLD_BACKGROUNDS)  # the pair views' backgrounds, in turn (a name twice
    # weighs it double; an odd count, so that each background meets both sides)


def trigger(concept: Concept, recipe: Recipe = Recipe()) -> str:
    """The concept's trigger: its letter, or (pivotal tuning) the learned word <letter>."""
    letter = TRIGGERS[concept.name]
    return f"<{letter}>" if recipe.trigger_ti_steps else letter


def partner(rng: random.Random, concept: Concept) -> tuple[str, str, str]:
    """The other object of a training scene: a named shape, colour and pattern all different from the concept's, and
    a triple the base model was trained on (so no benchmark concept ever appears in another's training images)."""
    while True:
        t = (rng.choice([s for s in NAMED_SHAPES if s != concept.shape]),
             rng.choice([c for c in COLORS if c != concept.color]),
             rng.choice([p for p in PATTERNS if p != concept.pattern]))
        if not is_held_out(Obj(*t, position="left")):
            return t


def training_scenes(concept: Concept, recipe: Recipe = Recipe()) -> list[tuple[Scene, str]]:
    """(scene, caption) pairs: `pair_views` two-object scenes, the concept on the left and on the right in turn,
    named first and second in turn ("a z circle on the left and a square on the right, on a gray background" /
    "a square on the left and a z circle on the right, …"), then `single_views` one-object views."""
    word, noun = trigger(concept, recipe), shape_word(concept.shape)
    rng = random.Random(f"conceptkit-compose-{concept.name}")
    backgrounds = list(recipe.backgrounds)
    out = []
    for i in range(recipe.pair_views):
        side, named_first = SIDES[i % 2], (i // 2) % 2 == 0
        other_side = "right" if side == "left" else "left"
        bg = backgrounds[i % len(backgrounds)]
        other = partner(rng, concept)
        mine = Obj(concept.shape, concept.color, concept.pattern, side, "medium")
        theirs = Obj(*other, position=other_side, size="medium")
        objs = (mine, theirs) if side == "left" else (theirs, mine)
        offsets = tuple((rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)) for _ in objs)
        a, b = (f"{word} {noun}", side), (shape_word(other[0]), other_side)
        first, second = (a, b) if named_first else (b, a)
        text = f"a {first[0]} on the {first[1]} and a {second[0]} on the {second[1]}, on a {bg} background"
        out.append((Scene(bg, objs, offsets), text))
    for i in range(recipe.single_views):
        bg, pos, size, offset = VIEWS[i % len(VIEWS)]
        obj = Obj(concept.shape, concept.color, concept.pattern, pos, size)
        out.append((Scene(bg, (obj,), (offset,)), f"a {size} {word} {noun} {POSITION_PHRASES[pos]}, on a {bg} "
                                                  "background"))
    return out


def training_folder(concept: Concept, folder: Path, recipe: Recipe = Recipe()) -> Path:
    """The concept's training images with one caption file each (kohya convention: 0.png + 0.txt)."""
    from PIL import Image

    from ..generate.infotext import rendered, save_png
    from ..shapes.render import render

    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, text) in enumerate(training_scenes(concept, recipe)):
        save_png(Image.fromarray(render(scene)), folder / f"{i:03d}.png", rendered(scene))
        atomic_write_text(folder / f"{i:03d}.txt", text + "\n")
    return folder


def lora_config(concept: Concept, recipe: Recipe = Recipe(), embedding: Path | None = None):
    from ..learn.lora_config import LoRAConfig

    return LoRAConfig(trigger=trigger(concept, recipe), class_word=shape_word(concept.shape),
                      description=concept.description, steps=recipe.steps, lr=recipe.lr, rank=recipe.rank,
                      batch=recipe.batch, text_encoder=recipe.text_encoder, latents=recipe.latents, seed=recipe.seed,
                      validation_prompts=(), embedding=None if embedding is None else str(embedding))


def learn_trigger(pipe, concept: Concept, out_dir: Path, recipe: Recipe, progress: bool = False) -> Path:
    """Pivotal tuning's first stage: the trigger word <letter> by Textual Inversion (learn/pivotal.py `learn_word`,
    initialised from the class word, the colour word or the description) on `trigger_ti_views` one-object views;
    returns its embedding file."""
    from ..learn.pivotal import learn_word

    run = out_dir / "trigger-words" / concept.name
    if (run / "learned_embeds.safetensors").exists():
        return run / "learned_embeds.safetensors"
    views = replace(recipe, pair_views=0, single_views=recipe.trigger_ti_views)  # (TI reads no captions)
    images = training_folder(concept, out_dir / "trigger-images" / concept.name, views)
    init = {"class": shape_word(concept.shape), "color": concept.color,
            "description": concept.description}[recipe.trigger_init]
    return learn_word(pipe, images, run, trigger(concept, recipe), init, recipe.trigger_ti_steps, seed=recipe.seed,
                      resume=True, progress=progress)


def train_concept_loras(pipe, out_dir: Path, concepts=COMPOSE_TUNE + COMPOSE_TEST, model_name: str = "toy",
                        recipe: Recipe = Recipe(), progress: bool = True) -> dict[str, Path]:
    """Train (or resume, or keep) one LoRA per concept into out_dir/<name>/, and copy each file to
    out_dir/<name>.safetensors (the bundled layout: `cp out_dir/*.safetensors bundled/loras/` ships them); returns
    {name: LoRA file}."""
    import shutil

    from ..learn.lora import learn_lora

    paths = {}
    for concept in concepts:
        run = out_dir / concept.name
        final = run / "pytorch_lora_weights.safetensors"
        if not final.exists():
            words = learn_trigger(pipe, concept, out_dir, recipe, progress) if recipe.trigger_ti_steps else None
            images = training_folder(concept, out_dir / "images" / concept.name, recipe)
            learn_lora(pipe, images, run, lora_config(concept, recipe, words), model_name=model_name,
                       resume=run.exists(), progress=progress)
        flat = out_dir / f"{concept.name}.safetensors"
        if not flat.exists() or flat.stat().st_mtime < final.stat().st_mtime:
            atomic_write(flat, lambda tmp: shutil.copyfile(final, tmp))
        paths[concept.name] = flat
    atomic_write_text(out_dir / "recipe.json", json.dumps(asdict(recipe), indent=2) + "\n")
    return paths


def lora_files(folder: Path | None, concepts=COMPOSE_TUNE + COMPOSE_TEST) -> dict[str, Path]:
    """{concept name: LoRA file} in `folder` (FOLDER/<name>.safetensors, or a training run FOLDER/<name>/); None:
    the bundled ones."""
    folder = Path(folder) if folder else bundled_loras_path()
    return {c.name: (folder / f"{c.name}.safetensors") if (folder / f"{c.name}.safetensors").exists()
            else folder / c.name / "pytorch_lora_weights.safetensors" for c in concepts}


def lora_spec(concept: Concept, files: dict[str, Path], name: str | None = None,
              ends: dict[str, float] | None = None) -> LoraSpec:
    """The concept's LoRA as a composition slot; its trigger is the one the file records (a letter, or a learned
    word the file bundles); `ends`: {concept name: the share of the steps its LoRA acts on} (calibrate_ends)."""
    from ..models.lora import read_lora_info

    word = read_lora_info(files[concept.name]).trigger or TRIGGERS[concept.name]
    return LoraSpec(name or slot(concept), str(files[concept.name]), word, shape_word(concept.shape),
                    concept.description, end=(ends or {}).get(concept.name))


# ---------------------------------------------------------------------------------------------------------------
# Calibration: how long each LoRA acts, chosen on its own training captions
# ---------------------------------------------------------------------------------------------------------------

END_CANDIDATES = (1.0, 0.67, 0.5)
# seeds of the training range (below EVAL_SEED_BASE): calibration is part of making the LoRA, and neither the tune
# nor the test seeds of the benchmark are used
CALIBRATION_SEEDS = (500, 501)
CALIBRATION_VIEWS = 10  # the first pair views of its training captions (the backgrounds cycle through all five)


BUNDLED_ENDS = "lora-ends.json"  # in bundled/loras: the ends calibrate_ends chose for the bundled benchmark LoRAs


def bundled_ends() -> dict[str, float]:
    """{concept name: end} of the bundled benchmark LoRAs, as `evaluate clora --calibrate-lora-ends` chose them."""
    data = json.loads((bundled_loras_path() / BUNDLED_ENDS).read_text(encoding="utf-8"))
    return {name: c["end"] for name, c in data["ends"].items()}


def choose_end(scores: dict[float, float]) -> float:
    """The end with the highest score; a tie goes to the longer end (the LoRA as usually run)."""
    return max(scores, key=lambda end: (scores[end], end))


def calibrate_ends(pipe, cfg: CLoRAConfig, concepts, files: dict[str, Path], recipe: Recipe = Recipe(),
                   candidates=END_CANDIDATES, seeds=CALIBRATION_SEEDS, views: int = CALIBRATION_VIEWS) -> dict:
    """{concept name: {"end": chosen, "scores": {end: share}}}. A LoRA's errors can sit in the steps where the
    object's texture is drawn (README, `evaluate clora`), and which concepts that hurts differs from concept to
    concept, so each LoRA's end is chosen alone: the LoRA samples its own first `views` training captions ("a <z>
    circle on the left and a square on the right, on a navy background") at `seeds`, once per candidate end, and
    scores the share of images with its concept (shape, colour, pattern) on the caption's side."""
    out = {}
    for concept in concepts:
        phrase = f"{trigger(concept, recipe)} {shape_word(concept.shape)}"
        sides_and_templates = [(next(o.position for o in scene.objects if triple(o) == triple(concept)),
                                caption.replace(phrase, "{x}"))
                               for scene, caption in training_scenes(concept, recipe)[:views]]
        scores = {}
        for end in candidates:
            hits = []
            for side, template in sides_and_templates:
                spec = replace(lora_spec(concept, files, "x"), end=end)
                images = compose(pipe, template, [spec], methods=["merge"], seeds=list(seeds), cfg=cfg).images["merge"]
                hits += [on_side(image, concept, side) for image in images]
                unload_concepts(pipe)
            scores[end] = round(sum(hits) / len(hits), 4)
        out[concept.name] = {"end": choose_end(scores), "scores": scores}
    return out


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------

def check_loras(files: dict[str, Path]) -> None:
    from ..errors import UserError

    missing = [str(p) for p in files.values() if not Path(p).is_file()]
    if missing:
        raise UserError(f"no concept LoRA at {missing[0]}: train them with `conceptkit evaluate clora --train-loras "
                        "DIR` (or pass --loras DIR holding <concept>.safetensors files)")


def evaluate_clora(pipe, cfg: CLoRAConfig, *, methods=METHODS, split: str = "test", seeds=None,
                   loras: Path | None = None, out_dir: Path | None = None, fidelity: bool = True,
                   progress: bool = True, calibrate: bool = False) -> dict:
    """Every case of the split at `seeds` (default: the split's 8) with every method; scores per method, per pair,
    and (fidelity=True) each LoRA alone. calibrate=True: each LoRA acts on the share of the steps calibrate_ends
    chooses for it (every method, the fidelity too)."""
    seeds = list(SPLIT_SEEDS[split] if seeds is None else seeds)
    files = lora_files(loras, SPLITS[split])
    check_loras(files)
    calibration = calibrate_ends(pipe, cfg, SPLITS[split], files) if calibrate else {}
    ends = {name: c["end"] for name, c in calibration.items()} or None
    if progress and calibration:
        print(json.dumps({"calibrated ends": calibration}), flush=True)
    methods = list(methods)
    results: dict[str, dict] = {m: {"reads": [], "seconds": 0.0} for m in methods}
    per_case = []
    for case in cases(split):
        specs = [lora_spec(c, files, ends=ends) for c in (case.first, case.second)]
        composed = compose(pipe, case.template, specs, methods=methods, seeds=seeds, cfg=cfg, regions=case.regions,
                           out_dir=None if out_dir is None else out_dir / case.name)
        row = {"template": case.template, "left": case.left.name, "right": case.right.name}
        for m in methods:
            reads = [read_pair(image, case.left, case.right) for image in composed.images[m]]
            results[m]["reads"] += reads
            results[m]["seconds"] += composed.seconds[m] * len(reads)
            row[m] = summarise(reads)["success"]
        per_case.append(row)
        if progress:
            print(json.dumps(row), flush=True)
        unload_concepts(pipe)
    out = {}
    for m, r in results.items():
        for k, v in summarise(r["reads"]).items():
            out[f"{m}.{k}"] = round(v, 4)
        out[f"{m}.seconds_per_image"] = round(r["seconds"] / len(r["reads"]), 3)
    out["images_per_method"] = len(results[methods[0]]["reads"])
    out["pairs"] = per_pair(per_case, methods)
    out["cases"] = per_case
    if fidelity:
        single = single_lora_fidelity(pipe, cfg, split=split, seeds=seeds, loras=loras, progress=progress, ends=ends)
        out["single_lora.fidelity"] = single["mean"]
        out["single_lora.per_concept"] = single
    if calibration:
        out["lora_ends"] = calibration
    out["settings"] = {"split": split, "methods": methods, "seeds": seeds, "loras": str(loras) if loras else "bundled",
                       "compose": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}}
    return out


def per_pair(per_case: list[dict], methods) -> list[dict]:
    """The cases' success averaged over sides and backgrounds, per unordered pair of concepts."""
    groups: dict[tuple, list[dict]] = {}
    for row in per_case:
        groups.setdefault(tuple(sorted((row["left"], row["right"]))), []).append(row)
    return [{"template": " + ".join(key), **{m: round(sum(r[m] for r in rows) / len(rows), 4) for m in methods}}
            for key, rows in groups.items()]


def single_lora_fidelity(pipe, cfg: CLoRAConfig, *, split: str = "test", seeds=None, loras: Path | None = None,
                         progress: bool = False, ends: dict[str, float] | None = None) -> dict:
    """The ceiling: each LoRA alone in every case it takes part in ("a z circle on the left and a square on the
    right, …": its own slot with its trigger, the other a plain class word), at the same seeds; the share of images
    with the concept's shape, colour and pattern on its side. A composition of two LoRAs can only succeed about as
    often as both would alone."""
    seeds = list(SPLIT_SEEDS[split] if seeds is None else seeds)
    files = lora_files(loras, SPLITS[split])
    check_loras(files)
    hits: dict[str, list[bool]] = {c.name: [] for c in SPLITS[split]}
    for case in cases(split):
        for concept, other, side in ((case.first, case.second, case.first_side),
                                     (case.second, case.first, case.second_side)):
            mine, plain = "{x}", shape_word(other.shape)
            template = case.prompt(mine, plain) if concept is case.first else case.prompt(plain, mine)
            composed = compose(pipe, template, [lora_spec(concept, files, "x", ends)], methods=["merge"], seeds=seeds,
                               cfg=cfg)
            hits[concept.name] += [on_side(image, concept, side) for image in composed.images["merge"]]
            unload_concepts(pipe)
        if progress:
            print(json.dumps({"fidelity so far": {k: round(sum(v) / len(v), 3) for k, v in hits.items() if v}}),
                  flush=True)
    out = {name: round(sum(h) / len(h), 4) for name, h in hits.items()}
    out["mean"] = round(sum(out.values()) / len(hits), 4)
    return out


def unload_concepts(pipe) -> None:
    from ..models.lora import loaded_adapters

    if loaded_adapters(pipe):
        pipe.unload_lora_weights()


def table(result: dict, methods=METHODS) -> str:
    nan = float("nan")
    lines = ["| method | success | concepts found | success, either side | attributes mixed | seconds / image |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        lines.append(f"| {m} | {result[f'{m}.success']:.3f} | {result[f'{m}.concepts_found']:.3f} | "
                     f"{result.get(f'{m}.success_any_side', nan):.3f} | {result.get(f'{m}.mixed', nan):.3f} | "
                     f"{result[f'{m}.seconds_per_image']:.2f} |")
    if "single_lora.fidelity" in result:
        lines.append(f"| (one LoRA alone, the ceiling) | — | {result['single_lora.fidelity']:.3f} | — | — | — |")
    return "\n".join(lines)
