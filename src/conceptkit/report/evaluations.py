"""`conceptkit report`: the JSON files of `conceptkit evaluate {base,ti,clora,profusion,oracle} --json` as one page.

Each file is recognised by its keys. Its main table is the one the evaluate command prints (the module's `table()`,
read back from its Markdown), so the page shows exactly the numbers the terminal did; per-pair and per-object
breakdowns and the recorded settings follow.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..errors import UserError
from .page import Page, Section

TITLES = {"base": "evaluate base", "ti": "evaluate ti", "clora": "evaluate clora", "profusion": "evaluate profusion",
          "oracle": "evaluate oracle", "images": "evaluate images", "dreambench": "evaluate dreambench"}
ABOUT = {
    "base": "Held-out prompts on the base model, read back by the oracle: the share of images with each requested "
            "attribute (single objects), and of two-object images with both objects present / both shapes right.",
    "ti": "Textual Inversion per bundled concept: fidelity = the oracle reads the concept's shape, colour and "
          "pattern (all three); adherence = the requested background, position and size. Baselines: S* replaced by "
          "the init word, and by the best plain-text description.",
    "clora": "Pairs of concept LoRAs in one image: success = two objects, matching the two concepts one-to-one with "
             "shape, colour and pattern all right; concepts found = the share of the two concepts that appear.",
    "profusion": "ProFusion on held-out objects from one image each: preservation = the object that stands for S* "
                 "(the largest; with two objects asked for, the one at S*'s side) keeps its shape, colour and "
                 "pattern (all three); adherence = the requested background, position and size, or for two-object "
                 "prompts background, both sides filled and the second object's shape, colour and pattern. ± SE: "
                 "over (object, seed) units, and clustered by object; fusion − other: paired differences. A sweep "
                 "file has one row per fusion setting (tune split).",
    "oracle": "How often the oracle reads scenes right: clean renders, and the VAE's reconstructions of them.",
    "images": "Generated images against real ones: CLIP-I and DINO = mean cosine over every generated x reference "
              "pair of L2-normalised embeddings (CLIP image features; DINO's CLS token), CLIP-T = cosine of each "
              "image with its prompt (CLIP text features; '—' when no prompt is known). Means ± standard error.",
    "dreambench": "DreamBooth's protocol on DreamBench: each subject learned from its photos, every prompt generated, "
                  "scored with DINO and CLIP-I (against the subject's real photos) and CLIP-T (the prompt without "
                  "the learned word). Means ± standard error over images; real images: two different photos of "
                  "the same subject.",
}


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (pass the file written by `conceptkit evaluate ... --json FILE`)") from None
    except (IsADirectoryError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e.__class__.__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return data


def kind_of(data) -> str | None:
    """Which evaluate command wrote this JSON, from its keys (None: none of them)."""
    if not isinstance(data, dict):
        return None
    if data.get("kind") in ("images", "dreambench") and isinstance(data.get("means"), dict):
        return data["kind"]
    if "single.shape" in data:
        return "base"
    if "ti.fidelity" in data and "concepts" in data:
        return "ti"
    if any(k.endswith(".preservation") for k in data):
        return "profusion"
    if any(k.endswith(".success") for k in data) and any(k.endswith(".concepts_found") for k in data):
        return "clora"
    if isinstance(data.get("clean"), dict) and "scenes" in data:
        return "oracle"
    return None


def markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a Markdown table as the evaluate modules print them."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return split(lines[0]), [split(line) for line in lines[2:]]


def main_table(kind: str, data: dict) -> str:
    from ..evaluate import base, clora, dreambench, images, oracle_accuracy, profusion, ti

    if kind == "images":
        return images.table(data)
    if kind == "dreambench":
        return dreambench.summary_table(data)
    if kind == "clora":
        return clora.table(data, [m for m in clora.METHODS if f"{m}.success" in data])
    return {"base": base.table, "ti": ti.table, "profusion": profusion.table, "oracle": oracle_accuracy.table}[kind](data)


def add_evaluation(page: Page, path: str | Path) -> Section:
    path = Path(path)
    data = load(path)
    kind = kind_of(data)
    if kind is None:
        keys = ", ".join(list(data)[:6]) if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path}: not the JSON of `conceptkit evaluate base|ti|clora|profusion|oracle|images|dreambench "
                        "--json` "
                        f"(found: {keys})")
    try:
        header, rows = markdown_table(main_table(kind, data))
        section = page.section(f"{TITLES[kind]}: {path.name}")
        section.text(ABOUT[kind]).table(header, rows)
        details(section, kind, data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: looks like `conceptkit {TITLES[kind]} --json` output but is incomplete or edited "
                        f"({e.__class__.__name__}: {e})") from None
    command = rerun_command(kind, data, path)
    if command:
        section.command(command, "re-run this evaluation (every setting it depends on is recorded in the file)")
    recorded = {k: data[k] for k in ("model",) if k in data}
    recorded.update(data["settings"] if isinstance(data.get("settings"), dict) else {})
    if recorded:
        section.code("\n".join(f"{k}: {json.dumps(v)}" for k, v in recorded.items()), "recorded settings")
    return section


def details(section: Section, kind: str, data: dict) -> None:
    """The breakdowns the file holds beyond its main table."""
    if kind == "clora":
        from ..evaluate.clora import METHODS

        methods = [m for m in METHODS if f"{m}.success" in data]
        if data.get("pairs"):
            section.table(["prompt"] + methods, [[p["template"]] + [float(p[m]) for m in methods] for p in data["pairs"]],
                          "success per pair")
        single = data.get("single_lora.per_concept")
        if isinstance(single, dict):
            section.table(["concept", "one LoRA alone: concept found"], [[k, float(v)] for k, v in single.items()],
                          "the ceiling: each LoRA alone")
    elif kind in ("images", "dreambench"):
        from ..evaluate.dreambench import subject_table

        if kind == "dreambench":
            section.table(*markdown_table(subject_table(data)), "per subject")
        number = lambda v: "—" if v is None else f"{float(v):.3f}"  # noqa: E731
        section.table(["image", "prompt", "CLIP-I", "CLIP-T", "DINO"],
                      [[r["file"], r["prompt"] or "—", number(r["clip_i"]), number(r["clip_t"]), number(r["dino"])]
                       for r in data["images"]], "per image")
    elif kind == "profusion" and data.get("objects"):
        methods = list(next(iter(data["objects"].values())))
        section.table(["object"] + [f"{m} (pres. / adh.)" for m in methods],
                      [[name] + [f"{r[m]['preservation']:.3f} / {r[m]['adherence']:.3f}" for m in methods]
                       for name, r in data["objects"].items()], "per test object")


def rerun_command(kind: str, data: dict, path: Path) -> str | None:
    """The evaluate command for the files that record every setting it takes (base, ti); None for the others."""
    from ..learn.ti_config import TIConfig

    s = data.get("settings")
    if not isinstance(s, dict):
        return None
    seeds = len(s.get("seeds", ()))
    if kind == "base" and "model" in data and (data.get("single.images"), data.get("double.images")) == (64 * seeds,
                                                                                                         32 * seeds):
        args = ["evaluate", "base", "--model", str(data["model"]), "--seeds", str(seeds), "--steps",
                str(s["steps"]), "--guidance-scale", f"{s['guidance_scale']:g}", "--scheduler", s["scheduler"]]
    elif kind == "ti" and isinstance(s.get("recipe"), dict) and (s.get("steps"), s.get("guidance_scale")) == (30, 7.5):
        r = s["recipe"]
        exposed = TIConfig(steps=r["steps"], lr=r["lr"], batch=r["batch"], vectors=r["vectors"],
                           init_word=r["init_word"], seed=r["seed"]).__dict__
        if json.loads(json.dumps({k: v for k, v in exposed.items() if k != "token"})) != r:
            return None  # a recipe the command line cannot give
        args = ["evaluate", "ti", "--model", str(s["model"]), "--concepts", ",".join(data["concepts"]),
                "--ti-steps", str(r["steps"]), "--lr", f"{r['lr']:g}", "--batch", str(r["batch"]),
                "--vectors", str(r["vectors"]), "--init-word", r["init_word"] or "", "--seed", str(r["seed"]),
                "--seeds", str(len(s["seeds"]))]
    else:
        return None
    return shlex.join(["conceptkit", *args, "--json", str(path)])


def write_report(files: list[str | Path], out_dir: str | Path, command: str) -> Path:
    """DIR/index.html with one section per JSON file; `command` is the one that made the page."""
    if not files:
        raise UserError("no JSON file given: pass the files written by `conceptkit evaluate ... --json FILE`")
    page = Page(out_dir, "conceptkit evaluations",
                [f"{len(files)} evaluation file(s). Shapes-world scores are read back from generated images by the "
                 "oracle (`conceptkit shapes read`), real-concept scores by CLIP and DINO (`evaluate images`, "
                 "`evaluate dreambench`); the tables are the ones each evaluate command prints."])
    for f in files:
        add_evaluation(page, f)
    page.section("How this page was made").command(command)
    return page.write()
