"""`conceptkit evaluate profusion`: does ProFusion keep one image's detail while following the prompt?

Test objects: 8 held-out (shape, colour, pattern) combinations (picked from HELD_OUT_TRIPLES for variety), which the
shipped PromptNet never saw in pre-training; one image each (large, centred, gray background). Held-out seeds
EVAL_SEED_BASE + k. Prompts (`prompts=`):
- `moved` (the default): prompts that move the object away from its reference: the five compositional prompts of
  `evaluate ti` (each asks for a size, a position and a background) with S* for the object, and four two-object
  prompts in the caption grammar's pair form ("a S* on the left and a blue plain square on the right, on a white
  background": S* on one side, on a background other than gray, a second object on the other side whose shape,
  colour and pattern all differ from the test object's, a combination the base model saw in training);
- `compositional`: the five compositional prompts only (the benchmark before; the README's first figures).
The oracle scores every image:
- preservation: the object that stands for S* has the test object's shape, colour and pattern (all three). With
  one object asked for, that is the largest object (as before); with two, the object the oracle reads at S*'s
  requested position (left or right), so the second object cannot stand in for it;
- adherence: the fraction of requested attributes the image has. One object: background, position, size (of the
  largest object). Two objects: background; position = an object is read at each requested side; second = the
  object at the second object's side has its shape, colour and pattern (all three). Three checks per image either
  way, so adherence is also the mean over images of each image's fraction.
Standard errors (`spread`, `paired`): the unit is one (object, seed): the mean over the prompts of that object and
seed. The prompts of one object and seed share the starting noise and the fine-tune, so single images are not
independent units; in a paired difference (fusion − plain: same object, fine-tune, seed and prompt) what the two
share cancels inside each pair. Units of one object still share its fine-tune, so each SE is also given clustered
by object (`*_se_objects`, the mean per object), the conservative one with few objects.
Methods: `fusion` (fine-tuned PromptNet, fusion sampling with the PromptNet's recommended settings, see
`profusion.sampling.recommended_fusion`), `fusion_notebook` (the same with the notebook's fusion call, §3.7), `plain`
(fine-tuned, plain sampling), `pretrained` (the pre-trained PromptNet without fine-tuning, fusion sampling),
`pretrained_plain`, `composed` and `pretrained_composed` (plain sampling's S*, fine-tuned or not, with a
two-object prompt's second object composed beside it by CLoRA instead of written into S*'s prompt: `composed`),
and `ti` (Textual Inversion on the same single image, its default recipe, DDIM with CFG 7.5).
`sweep_profusion` samples fusion (fine-tuned, once per object) at each setting of a grid, on the tune split only.
"""
from __future__ import annotations

import itertools
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from ..errors import UserError
from ..generate.images import generate
from ..generate.infotext import Settings, rendered, save_png
from ..learn.promptnet import finetune_promptnet, scene_caption
from ..learn.promptnet_config import FinetuneConfig
from ..learn.textual_inversion import learn_textual_inversion
from ..learn.ti_config import TIConfig
from ..models.loading import bundled_promptnet_path, load_pipeline
from ..profusion.sampling import FusionConfig, generate_profusion, recommended_fusion
from ..profusion.saved import load_promptnet
from ..shapes.captions import POSITION_PHRASES, object_phrase
from ..shapes.render import render
from ..shapes.world import COLORS, EVAL_SEED_BASE, HELD_OUT_TRIPLES, NAMED_SHAPES, PATTERNS, Obj, Scene
from .profusion_sweep import effective, label
from .similarity import mean_se
from .ti import COMPOSITIONAL

METHODS = ("fusion", "fusion_notebook", "plain", "pretrained", "pretrained_plain", "composed", "pretrained_composed",
           "ti")
DEFAULT_METHODS = tuple(m for m in METHODS if not m.endswith("composed"))  # composed: an option, not the benchmark
FINETUNED = ("fusion", "fusion_notebook", "plain", "composed")
PROMPT_SETS = ("moved", "compositional")
# two-object prompts: (S*'s side, background); the second object takes the other side
TWO_OBJECT = (("left", "white"), ("right", "brown"), ("left", "navy"), ("right", "teal"))
ADHERENCE = ("background", "position", "size", "second")
SECOND = "<second object>"


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


# ------------------------------------------------------------------------------------ prompts

@dataclass(frozen=True)
class BenchPrompt:
    text: str  # with S*
    template: str  # the same for every object: the second object written as SECOND
    requested: dict  # background, position, size; or background, position (S*'s side), second (an Obj)


def second_objects(triple: tuple[str, str, str], n: int) -> list[tuple[str, str, str]]:
    """n different (shape, colour, pattern) for the second object of the test object `triple`'s two-object prompts:
    named shapes, combinations seen in training, shape, colour and pattern each unlike the test object's
    (deterministic per test object)."""
    held = set(HELD_OUT_TRIPLES)
    pool = [t for t in itertools.product(NAMED_SHAPES, COLORS, PATTERNS)
            if t not in held and all(a != b for a, b in zip(t, triple))]
    return random.Random("second object of " + "-".join(triple)).sample(pool, n)


def bench_prompts(triple: tuple[str, str, str], prompt_set: str = "moved") -> list[BenchPrompt]:
    if prompt_set not in PROMPT_SETS:
        raise UserError(f"prompt set {prompt_set!r}: pass one of {', '.join(PROMPT_SETS)}")
    prompts = [BenchPrompt(t.format("S*"), t.format("S*"), dict(r)) for t, r in COMPOSITIONAL]
    if prompt_set == "compositional":
        return prompts
    for (side, background), other in zip(TWO_OBJECT, second_objects(triple, len(TWO_OBJECT))):
        second = Obj(*other, position="right" if side == "left" else "left", size="medium")
        # the canonical pair caption (shapes/captions.py caption(), as evaluate base asks for pairs): left object
        # first, no size word (pairs are one size), "plain" said
        text = {side: f"a S* {POSITION_PHRASES[side]}", second.position: object_phrase(second)}
        blank = {side: text[side], second.position: f"{SECOND} {POSITION_PHRASES[second.position]}"}
        tail = f", on a {background} background"
        prompts.append(BenchPrompt(f"{text['left']} and {text['right']}{tail}",
                                   f"{blank['left']} and {blank['right']}{tail}",
                                   {"background": background, "position": side, "second": second}))
    return prompts


# ------------------------------------------------------------------------------------ scoring

def at(reading, position: str):
    """The (largest) object the oracle reads at `position`, or None."""
    here = [o for o in reading.objects if o.position == position]
    return max(here, key=lambda o: o.area) if here else None


def score(image, triple, requested: dict) -> dict:
    """One image's checks (booleans). `requested`: background, position, size (one object), or background,
    position (S*'s side) and second (the second object, an Obj with its position)."""
    from ..shapes import oracle

    reading = oracle.read(image)
    second = requested.get("second")
    if second is None:
        obj = max(reading.objects, key=lambda o: o.area) if reading.objects else None
        other = None
    else:
        obj, other = at(reading, requested["position"]), at(reading, second.position)
    row = {"preservation": obj is not None and (obj.shape, obj.color, obj.pattern) == tuple(triple)}
    for i, attr in enumerate(("shape", "color", "pattern")):
        row[f"kept_{attr}"] = obj is not None and getattr(obj, attr) == triple[i]
    for attr, want in requested.items():
        if attr == "background":
            row[attr] = reading.background == want
        elif attr == "second":
            row[attr] = other is not None and (other.shape, other.color, other.pattern) == want.triple
            for a in ("shape", "color", "pattern"):
                row[f"second_{a}"] = other is not None and getattr(other, a) == getattr(want, a)
        elif attr == "position" and second is not None:  # the layout: an object on each requested side
            row[attr] = obj is not None and other is not None
        else:
            row[attr] = getattr(obj, attr, None) == want
    return row


def adherence_of(row: dict) -> float:
    """The share of the requested attributes one image has."""
    checks = [row[a] for a in ADHERENCE if a in row]
    return sum(checks) / len(checks)


def total(row: dict) -> float:
    """preservation + adherence of one image."""
    return row["preservation"] + adherence_of(row)


def _share(rows: list[dict], key: str) -> float | None:
    having = [r[key] for r in rows if key in r]
    return sum(having) / len(having) if having else None


def summarise(rows: list[dict]) -> dict:
    """Means over the images: preservation, adherence and each attribute (over the images that ask for it; an
    attribute no image asks for is left out)."""
    out = {"preservation": sum(r["preservation"] for r in rows) / len(rows),
           "adherence": sum(adherence_of(r) for r in rows) / len(rows)}
    for key, name in [(f"kept_{a}", f"preservation_{a}") for a in ("shape", "color", "pattern")] + \
            [(a, f"adherence_{a}") for a in ADHERENCE] + [(f"second_{a}", f"second_{a}")
                                                          for a in ("shape", "color", "pattern")]:
        share = _share(rows, key)
        if share is not None:
            out[name] = share
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def spread(rows: list[dict], value=total) -> dict:
    """The mean of value(row) and its standard errors: over (object, seed) units (`se`: each unit the mean over its
    prompts) and clustered by object (`se_objects`: each object the mean over its seeds and prompts). None below
    two units. Rows carry `object` and `seed`."""
    units, objects = defaultdict(list), defaultdict(list)
    for r in rows:
        units[(r["object"], r["seed"])].append(value(r))
        objects[r["object"]].append(value(r))
    by_unit = mean_se([_mean(v) for v in units.values()])
    by_object = mean_se([_mean(v) for v in objects.values()])
    return {"mean": _mean([value(r) for r in rows]), "se": by_unit["se"], "se_objects": by_object["se"],
            "units": by_unit["n"], "objects": by_object["n"]}


def paired(rows_a: list[dict], rows_b: list[dict], value=total) -> dict:
    """spread() of value(a) − value(b) over images paired by (object, seed, prompt): both methods must cover the
    same ones."""
    key = lambda r: (r["object"], r["seed"], r["prompt"])  # noqa: E731
    b = {key(r): r for r in rows_b}
    if len(b) != len(rows_b) or {key(r) for r in rows_a} != set(b) or len(rows_a) != len(rows_b):
        raise ValueError("paired: the two methods do not cover the same (object, seed, prompt) images")
    return spread([{"object": r["object"], "seed": r["seed"], "d": value(r) - value(b[key(r)])} for r in rows_a],
                  value=lambda r: r["d"])


def _rounded(x):
    return None if x is None else round(x, 4)


def method_results(name: str, rows: list[dict]) -> dict:
    """Flat `<name>.<key>` results: the summary, preservation + adherence (`sum`) and the standard errors."""
    out = {f"{name}.{k}": round(v, 4) for k, v in summarise(rows).items()}
    s = spread(rows)
    out.update({f"{name}.sum": round(s["mean"], 4), f"{name}.sum_se": _rounded(s["se"]),
                f"{name}.sum_se_objects": _rounded(s["se_objects"])})
    for part, value in (("preservation", lambda r: float(r["preservation"])), ("adherence", adherence_of)):
        p = spread(rows, value)
        out[f"{name}.{part}_se"] = _rounded(p["se"])
        out[f"{name}.{part}_se_objects"] = _rounded(p["se_objects"])
    return out


def difference_results(name: str, rows_a: list[dict], rows_b: list[dict]) -> dict:
    """Flat `<name>.<key>` results of the paired difference a − b: sum_diff with its SEs, and the parts."""
    d = paired(rows_a, rows_b)
    out = {f"{name}.sum_diff": round(d["mean"], 4), f"{name}.sum_diff_se": _rounded(d["se"]),
           f"{name}.sum_diff_se_objects": _rounded(d["se_objects"])}
    for part, value in (("preservation", lambda r: float(r["preservation"])), ("adherence", adherence_of)):
        p = paired(rows_a, rows_b, value)
        out[f"{name}.{part}_diff"] = round(p["mean"], 4)
        out[f"{name}.{part}_diff_se"] = _rounded(p["se"])
    return out


# ------------------------------------------------------------------------------------ running

@dataclass
class Case:
    """One test object: its files, reference tensor and prompts."""
    triple: tuple[str, str, str]
    name: str
    folder: Path
    reference_path: Path
    reference: torch.Tensor
    prompts: list[BenchPrompt]


def prepare(triple, out_dir: Path, size: int, prompt_set: str) -> Case:
    name = "-".join((triple[1], triple[2], triple[0]))
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    scene = test_scene(triple)
    reference_path = folder / "reference.png"
    save_png(Image.fromarray(render(scene)), reference_path, rendered(scene))
    reference = torch.from_numpy(render(scene)).permute(2, 0, 1)[None].float() / 127.5 - 1
    if reference.shape[-1] != size:
        reference = torch.nn.functional.interpolate(reference, size=(size, size), mode="bicubic")
    return Case(tuple(triple), name, folder, reference_path, reference, bench_prompts(triple, prompt_set))


def rows_of(case: Case, images: list, seeds: int, seed0: int) -> list[dict]:
    """Score the images of prompts × seeds (prompt k, seed j is image k·seeds + j), each row tagged with its
    object, seed and prompt."""
    return [{"object": case.name, "seed": seed0 + i % seeds, "prompt": i // seeds,
             **score(image, case.triple, case.prompts[i // seeds].requested)} for i, image in enumerate(images)]


def finetuned(pipe, pretrained, case: Case, finetune: FinetuneConfig, model: str, caption: bool = False):
    """The PromptNet fine-tuned on the case's image, and the seconds it took. caption: with the reference image's
    own caption ("a large S* in the center, on a gray background"), as a user's `--caption` would say it."""
    if caption:
        finetune = replace(finetune, caption=scene_caption(test_scene(case.triple)))
    t0 = time.perf_counter()
    finetune_promptnet(pipe, pretrained, case.reference_path, case.folder / "promptnet", finetune, model_name=model,
                       progress=False)
    seconds = time.perf_counter() - t0
    return load_promptnet(case.folder / "promptnet", pipe), seconds


def sample(pipe, saved, case: Case, cfg: FusionConfig, seeds: int, seed0: int, folder: Path):
    return generate_profusion(pipe, saved, case.reference, [p.text for p in case.prompts], cfg, seed=seed0,
                              num_images=seeds, batch_size=len(case.prompts) * seeds, progress=False,
                              out_dir=folder).images


def composed(pipe, saved, case: Case, plain: FusionConfig, seeds: int, seed0: int, folder: Path,
             second_class: str | None = None) -> list:
    """Plain sampling's S*, but in a two-object prompt the second object is a concept of its own, written in words
    (compose --words), beside the image's S* (compose --image): CLoRA's masks give each object's pixels to its own
    branch, and S*'s branch never says the second object's colour or pattern (in one prompt they spread onto S*'s
    object: README, ProFusion, "What the pink is"). CLoRA's settings are `evaluate clora`'s recommended ones, chosen
    on its tune split; guidance and s as plain sampling's. One-object prompts: plain sampling, unchanged.
    second_class: the word S*'s branch says for the second object (None: its shape word)."""
    from ..compose.concepts import ImageSpec, WordsSpec
    from ..compose.config import CLoRAConfig
    from ..compose.run import compose
    from ..profusion.saved import unet_attention_applied
    from ..shapes.captions import shape_word

    cfg = CLoRAConfig(steps=plain.steps, guidance_scale=plain.guidance_scale, iterative_steps=(0,),
                      iterative_steps_steps=10, mask_exclusive=True, mask_threshold=0.0, mask_combine="sum")
    words_only = replace(saved, unet_attention=None)  # applied around the call: every branch gets it, as in plain
    images = []
    for prompt in case.prompts:
        second = prompt.requested.get("second")
        if second is None:
            images += generate_profusion(pipe, saved, case.reference, [prompt.text], plain, seed=seed0,
                                         num_images=seeds, batch_size=seeds, progress=False).images
            continue
        words = f"{second.color} {second.pattern} {shape_word(second.shape)}"
        placeholder = plain.placeholder
        if prompt.text.count(words) != 1 or prompt.text.count(placeholder) != 1:
            raise ValueError(f"cannot find the second object {words!r} and {placeholder} in {prompt.text!r}")
        template = prompt.text.replace(placeholder, "{image}").replace(words, "{second}")
        specs = [ImageSpec("image", str(case.reference_path), plain.class_word),
                 WordsSpec("second", words, second_class or shape_word(second.shape))]
        with unet_attention_applied(pipe.unet, saved.unet_attention):
            images += compose(pipe, template, specs, methods=["clora"], seeds=[seed0 + j for j in range(seeds)],
                              cfg=cfg, promptnet=words_only).images["clora"]
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i // seeds:02d}-s{seed0 + i % seeds}.png")
    return images


def split_of(split: str) -> tuple[tuple, int]:
    if split not in ("test", "tune"):
        raise UserError(f"split {split!r}: pass test or tune")
    return (TEST_TRIPLES, EVAL_SEED_BASE) if split == "test" else (TUNE_TRIPLES, TUNE_SEED_BASE)


def per_prompt(cases: list[Case], rows: dict[str, list[dict]]) -> dict:
    """{prompt template: {method: {preservation, adherence}}} over every object and seed."""
    out = {}
    for k, p in enumerate(cases[0].prompts):
        out[p.template] = {m: {key: round(val, 4) for key, val in summarise([r for r in rs if r["prompt"] == k]).items()
                               if key in ("preservation", "adherence")} for m, rs in rows.items()}
    return out


def finetune_summary(seconds: dict[str, float]) -> dict:
    if not seconds:
        return {}
    return {"finetune_seconds": round(sum(seconds.values()) / len(seconds), 1),
            "finetune_seconds_max": round(max(seconds.values()), 1),
            "finetune_seconds_per_object": {k: round(v, 1) for k, v in seconds.items()}}


def evaluate_profusion(model: str = "toy", promptnet: str | Path | None = None, *, methods=DEFAULT_METHODS, seeds: int = 4,
                       steps: int = 50, finetune: FinetuneConfig | None = None, fusion: FusionConfig | None = None,
                       fusion_overrides: dict | None = None,
                       ti: TIConfig | None = None, objects: int = len(TEST_TRIPLES), split: str = "test",
                       prompts: str = "moved", out_dir: str | Path = "outputs/evaluate-profusion",
                       finetune_caption: bool = False, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    triples, seed0 = split_of(split)
    bench_prompts(triples[0], prompts)  # a bad prompt set fails before the model loads
    finetune = finetune or FinetuneConfig()
    ti = ti or TIConfig()
    pipe = load_pipeline(model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pretrained = load_promptnet(promptnet or bundled_promptnet_path(model), pipe)
    fusion = replace(fusion or recommended_fusion(pretrained), **(fusion_overrides or {}), steps=steps)
    notebook = FusionConfig(steps=steps, class_word=fusion.class_word)
    # plain reads S* as strongly as fusion's main step does (a folder's recommended emb_scale, or the override)
    plain = FusionConfig.plain(steps=steps, class_word=fusion.class_word, emb_scale=fusion.emb_scale)
    rows = {m: [] for m in methods}
    seconds = {m: 0.0 for m in methods}
    finetune_seconds, per_object, showcase, cases = {}, {}, [], []
    for triple in triples[:objects]:
        case = prepare(triple, out_dir, size, prompts)
        cases.append(case)
        texts = [p.text for p in case.prompts]
        here, images = {}, {}
        tuned = None
        if set(FINETUNED) & set(methods):
            tuned, finetune_seconds[case.name] = finetuned(pipe, pretrained, case, finetune, model, finetune_caption)
        for method in methods:
            t0 = time.perf_counter()
            if method == "ti":
                (case.folder / "ti-image").mkdir(exist_ok=True)
                scene = test_scene(triple)
                save_png(Image.fromarray(render(scene)), case.folder / "ti-image" / "0.png", rendered(scene))
                token = f"<{case.name}>"
                run = replace(ti, token=token, validation_prompts=())
                fresh = load_pipeline(model)
                train_start = time.perf_counter()
                learn_textual_inversion(fresh, case.folder / "ti-image", case.folder / "ti", run, model_name=model,
                                        progress=False)
                t0 += time.perf_counter() - train_start  # seconds = generation only, as for the others
                result = generate(fresh, [p.replace("S*", token) for p in texts], seed=seed0,
                                  num_images=seeds, steps=steps, guidance_scale=7.5, progress=False,
                                  out_dir=case.folder / method).images
            else:
                saved = tuned if method in FINETUNED else pretrained
                cfg = {"fusion": fusion, "pretrained": fusion, "fusion_notebook": notebook}.get(method, plain)
                if method in ("composed", "pretrained_composed"):
                    result = composed(pipe, saved, case, cfg, seeds, seed0, case.folder / method)
                else:
                    result = sample(pipe, saved, case, cfg, seeds, seed0, case.folder / method)
            seconds[method] += time.perf_counter() - t0
            here[method] = rows_of(case, result, seeds, seed0)
            rows[method] += here[method]
            images[method] = result
        per_object[case.name] = {m: summarise(here[m]) for m in methods}
        showcase.append((case.reference_path, images))
        if progress:
            print(case.name + ": " + " | ".join(f"{m} {per_object[case.name][m]['preservation']:.2f}/"
                                               f"{per_object[case.name][m]['adherence']:.2f}" for m in methods),
                  flush=True)
    n_images = len(cases[0].prompts) * seeds * len(cases)
    results = {}
    for m in methods:
        results.update(method_results(m, rows[m]))
        results[f"{m}.seconds"] = round(seconds[m] / n_images, 3)
    if "fusion" in methods:
        for other in methods:
            if other != "fusion":
                results.update(difference_results(f"fusion-{other}", rows["fusion"], rows[other]))
    results.update(finetune_summary(finetune_seconds))
    results["objects"] = per_object
    results["prompts"] = per_prompt(cases, rows)
    results["standard_errors"] = {"unit": "object x seed (the mean over its prompts)", "units": len(cases) * seeds,
                                  "objects": len(cases), "also": "*_se_objects: clustered by object"}
    results["settings"] = {"model": model, "promptnet": str(pretrained.folder), "steps": steps,
                           "split": split, "seeds": [seed0 + k for k in range(seeds)], "prompt_set": prompts,
                           "prompts": [p.template for p in cases[0].prompts],
                           "prompts_per_object": {c.name: [p.text for p in c.prompts] for c in cases},
                           "fusion": fusion.__dict__, "fusion_notebook": notebook.__dict__, "plain": plain.__dict__,
                           "finetune": finetune.__dict__, "finetune_caption": finetune_caption,
                           "ti": {k: v for k, v in ti.__dict__.items() if k != "token"},
                           "threads": torch.get_num_threads()}
    write_showcase(showcase, [m for m in ("fusion", "plain") if m in methods] or list(methods)[:1], seeds,
                   out_dir / "grid.png", Settings(prompt="", steps=steps, sampler="ddim", seed=seed0, model=model),
                   prompts=len(cases[0].prompts))
    return results


def sweep_profusion(model: str = "toy", promptnet: str | Path | None = None, *, settings: list[dict],
                    seeds: int = 4, steps: int = 50, finetune: FinetuneConfig | None = None,
                    fusion_overrides: dict | None = None, objects: int = len(TUNE_TRIPLES), split: str = "tune",
                    prompts: str = "moved", out_dir: str | Path = "outputs/evaluate-profusion-sweep",
                    finetune_caption: bool = False, progress: bool = True) -> dict:
    """Fusion sampling (fine-tuned PromptNet) at each of `settings` (FusionConfig fields over the PromptNet's
    recommended settings and `fusion_overrides`), and plain sampling once as the baseline of the paired
    differences. Each object is fine-tuned once; settings that sample the same images (see profusion_sweep.effective)
    are sampled once. Tune split only: settings chosen on the test objects would not be held out."""
    if split != "tune":
        raise UserError(f"--sweep with --split {split}: settings are chosen on the tune split only (the test split "
                        "stays held out): pass --split tune (the default with --sweep), then evaluate the chosen "
                        "setting once with --split test")
    if not settings:
        raise UserError("--sweep: no setting to sample: pass --sweep KEY=V1,V2,...")
    out_dir = Path(out_dir)
    triples, seed0 = split_of(split)
    bench_prompts(triples[0], prompts)
    finetune = finetune or FinetuneConfig()
    pipe = load_pipeline(model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pretrained = load_promptnet(promptnet or bundled_promptnet_path(model), pipe)
    base = replace(recommended_fusion(pretrained), **(fusion_overrides or {}), steps=steps)
    try:
        configs = [replace(base, **s) for s in settings]
    except ValueError as e:
        raise UserError(f"--sweep: {e}") from None
    plain = FusionConfig.plain(steps=steps, class_word=base.class_word, emb_scale=base.emb_scale)
    keys = [effective(c.__dict__) for c in configs]
    first = {}
    same_as = [first.setdefault(k, i) for i, k in enumerate(keys)]
    labels = [label(s) or "(the base settings)" for s in settings]
    rows = {"plain": [], **{i: [] for i in range(len(configs))}}
    seconds = defaultdict(float)
    finetune_seconds, per_object, cases = {}, {}, []
    for triple in triples[:objects]:
        case = prepare(triple, out_dir, size, prompts)
        cases.append(case)
        tuned, finetune_seconds[case.name] = finetuned(pipe, pretrained, case, finetune, model, finetune_caption)
        here = {}
        for i, cfg in [("plain", plain)] + list(enumerate(configs)):
            if i != "plain" and same_as[i] != i:
                here[i] = here[same_as[i]]
                continue
            t0 = time.perf_counter()
            images = sample(pipe, tuned, case, cfg, seeds, seed0,
                            case.folder / ("plain" if i == "plain" else f"sweep-{i + 1}"))
            seconds[i] += time.perf_counter() - t0
            here[i] = rows_of(case, images, seeds, seed0)
        for i in here:
            rows[i] += here[i]
        per_object[case.name] = {"plain": summarise(here["plain"]),
                                 **{f"#{i + 1} {labels[i]}": summarise(here[i]) for i in range(len(configs))}}
        if progress:
            print(case.name + ": plain " + f"{summarise(here['plain'])['preservation']:.2f}/"
                  f"{summarise(here['plain'])['adherence']:.2f} | " +
                  " | ".join(f"#{i + 1} {summarise(here[i])['preservation']:.2f}/{summarise(here[i])['adherence']:.2f}"
                             for i in range(len(configs))), flush=True)
    n_images = len(cases[0].prompts) * seeds * len(cases)
    results = method_results("plain", rows["plain"])
    results["plain.seconds"] = round(seconds["plain"] / n_images, 3)
    sweep = []
    for i, (setting, cfg) in enumerate(zip(settings, configs)):
        flat = {**method_results("s", rows[i]), **difference_results("d", rows[i], rows["plain"])}
        entry = {"setting": setting, "label": labels[i], "fusion": cfg.__dict__,
                 **{k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("s.")},
                 **{"plain_" + k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("d.")},
                 "seconds": round(seconds[same_as[i]] / n_images, 3),
                 "same_as": None if same_as[i] == i else same_as[i] + 1}
        sweep.append(entry)
    results["sweep"] = sweep
    results.update(finetune_summary(finetune_seconds))
    results["objects"] = per_object
    results["prompts"] = per_prompt(cases, {"plain": rows["plain"], **{f"#{i + 1}": rows[i]
                                                                        for i in range(len(configs))}})
    results["standard_errors"] = {"unit": "object x seed (the mean over its prompts)", "units": len(cases) * seeds,
                                  "objects": len(cases), "also": "*_se_objects: clustered by object"}
    results["settings"] = {"model": model, "promptnet": str(pretrained.folder), "steps": steps, "split": split,
                           "seeds": [seed0 + k for k in range(seeds)], "prompt_set": prompts,
                           "prompts": [p.template for p in cases[0].prompts],
                           "prompts_per_object": {c.name: [p.text for p in c.prompts] for c in cases},
                           "sweep_base": base.__dict__, "plain": plain.__dict__, "finetune": finetune.__dict__,
                           "finetune_caption": finetune_caption,
                           "threads": torch.get_num_threads()}
    return results


def write_showcase(rows, methods: list[str], seeds: int, path: Path, settings: Settings | None = None,
                   scale: int = 2, prompts: int = len(COMPOSITIONAL)) -> Path:
    """One row per test object: the reference, then each prompt (first seed) for each of `methods`."""
    n = prompts
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
                                        f"{', '.join(methods)} on the benchmark's prompts (first seed)"))
    return path


# ------------------------------------------------------------------------------------ tables

NAMES = {"fusion": "fusion sampling (fine-tuned)", "fusion_notebook": "fusion sampling, notebook settings (fine-tuned)",
         "plain": "plain sampling (fine-tuned)",
         "pretrained": "pre-trained, no fine-tuning (fusion)", "pretrained_plain": "pre-trained, no fine-tuning (plain)",
         "composed": "plain sampling (fine-tuned), a second object composed (CLoRA, --words)",
         "pretrained_composed": "pre-trained, no fine-tuning (plain), a second object composed",
         "ti": "Textual Inversion on the one image"}
HEADER = ("| {first} | preservation | (shape / colour / pattern) | adherence | background | position | size | "
          "second object | preservation + adherence | ± SE (object × seed) | ± SE (object) |{extra} s / image |")


def _f(value, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _row(title: str, r: dict, extra: str = "") -> str:
    return (f"| {title} | {_f(r['preservation'])} | {_f(r.get('preservation_shape'), 2)} / "
            f"{_f(r.get('preservation_color'), 2)} / {_f(r.get('preservation_pattern'), 2)} | {_f(r['adherence'])} | "
            f"{_f(r.get('adherence_background'))} | {_f(r.get('adherence_position'))} | {_f(r.get('adherence_size'))} | "
            f"{_f(r.get('adherence_second'))} | {_f(r.get('sum', r['preservation'] + r['adherence']))} | "
            f"{_f(r.get('sum_se'))} | {_f(r.get('sum_se_objects'))} |{extra} {_f(r.get('seconds'), 2)} |")


def _in_se(diff: float, se: float | None) -> str:
    return "" if not se else f" ({diff / se:+.1f} SE)"


def _finetune_line(results: dict) -> list[str]:
    if "finetune_seconds" not in results:
        return []
    threads = results.get("settings", {}).get("threads")
    return [f"fine-tuning: {results['finetune_seconds']:.1f} s per object on average, "
            f"{results.get('finetune_seconds_max', results['finetune_seconds']):.1f} s at most"
            + (f" ({threads} threads)" if threads else "")]


def table(results: dict) -> str:
    """The methods (± standard errors of preservation + adherence), then the paired differences of fusion and
    every other method; for a sweep (`results["sweep"]`), one row per setting."""
    if "sweep" in results:
        return sweep_table(results)
    lines = [HEADER.format(first="method", extra=""), "|---" * 12 + "|"]
    for m in METHODS:
        if f"{m}.preservation" not in results:
            continue
        r = {k.split(".", 1)[1]: v for k, v in results.items() if k.startswith(f"{m}.")}
        lines.append(_row(NAMES[m], r))
    for m in METHODS:
        key = f"fusion-{m}"
        if f"{key}.sum_diff" not in results:
            continue
        d = {k.split(".", 1)[1]: v for k, v in results.items() if k.startswith(f"{key}.")}
        dash = " — |"
        lines.append(f"| fusion − {m} (paired: same objects, prompts, seeds) | {_f(d['preservation_diff'], sign=True)} |"
                     f"{dash} {_f(d['adherence_diff'], sign=True)} |{dash * 4} "
                     f"{_f(d['sum_diff'], sign=True)}{_in_se(d['sum_diff'], d['sum_diff_se'])} | "
                     f"{_f(d['sum_diff_se'])} | {_f(d['sum_diff_se_objects'])} |{dash}")
    return "\n".join(lines + _finetune_line(results))


def sweep_table(results: dict) -> str:
    lines = [HEADER.format(first="setting", extra=" − plain (paired) | ± SE |"), "|---" * 14 + "|"]
    plain = {k.split(".", 1)[1]: v for k, v in results.items() if k.startswith("plain.")}
    lines.append(_row("plain sampling (fine-tuned), the baseline", plain, " — | — |"))
    for i, s in enumerate(results["sweep"]):
        same = f" (= #{s['same_as']})" if s.get("same_as") else ""
        lines.append(_row(f"#{i + 1} {s['label']}{same}", s,
                          f" {_f(s['plain_sum_diff'], sign=True)}{_in_se(s['plain_sum_diff'], s['plain_sum_diff_se'])}"
                          f" | {_f(s['plain_sum_diff_se'])} |"))
    best = max(range(len(results["sweep"])), key=lambda i: results["sweep"][i]["sum"])
    lines.append(f"highest preservation + adherence: #{best + 1} {results['sweep'][best]['label']}")
    return "\n".join(lines + _finetune_line(results))
