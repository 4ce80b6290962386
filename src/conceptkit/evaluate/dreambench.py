"""`conceptkit evaluate dreambench`: DreamBooth's evaluation protocol on a local copy of DreamBench.

DreamBench (github.com/google/dreambooth, `dataset/`): 30 subject folders of 4-6 real photos each, and
`prompts_and_classes.txt`, which lists each subject's class noun ("subject_name,class") and two lists of 25 prompt
templates, one for objects and one for live subjects (cats and dogs), written `'a {0} {1} in the jungle'` with
{0} the unique identifier and {1} the class noun. A simpler layout is read too: `prompts.txt` (one template a line,
the same {0}/{1}) and optionally `classes.txt` ("subject,class" lines; default class: the folder name).

The protocol, per subject: learn the subject from its photos with the chosen method (`ti`: a new word `<subject>`,
initialised from the class noun when it is one token; `lora`: DreamBooth-style LoRA on "a photo of sks CLASS"), then
generate every prompt template (identifier = the word or `sks`; class noun kept, as DreamBooth writes "a [V] dog")
with `images_per_prompt` seeds (DreamBooth: 4, so 30 × 25 × 4 = 3,000 images), and score each image (similarity.py):
CLIP-I and DINO against every real photo of its subject, CLIP-T against the prompt without the identifier
("a dog in the jungle": the scoring CLIP does not know the learned word). Means over all images, with standard
errors; the "real images" row is the mean similarity between two different real photos of the same subject (the
ceiling papers print beside their methods).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_write_text
from .images import image_paths, read_rgb
from .similarity import ClipScorer, DinoScorer, mean_se, score, summarise

LIVE_CLASSES = {"cat", "dog"}
PROMPTS_FILE = "prompts_and_classes.txt"
METHODS = ("ti", "lora")


@dataclass(frozen=True)
class Subject:
    name: str
    cls: str
    folder: Path

    @property
    def live(self) -> bool:
        return self.cls.split()[-1].lower() in LIVE_CLASSES


@dataclass
class Bench:
    subjects: list[Subject]
    object_prompts: list[str]
    live_prompts: list[str]

    def prompts(self, subject: Subject) -> list[str]:
        return self.live_prompts if subject.live else self.object_prompts


def _templates(lines: list[str]) -> list[str]:
    return [m.group(1) for line in lines for m in [re.search(r"""['"](.*\{0\}.*)['"]\s*\.format""", line)] if m]


def read_dreambench(data: str | Path) -> Bench:
    """The subjects and prompt templates of a DreamBench-layout folder (or its `dataset/` inside), or one line
    saying what is missing."""
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"--data {data}: no such folder; pass a DreamBench copy (subject folders + {PROMPTS_FILE})")
    if not (root / PROMPTS_FILE).is_file() and (root / "dataset" / PROMPTS_FILE).is_file():
        root = root / "dataset"
    classes: dict[str, str] = {}
    if (root / PROMPTS_FILE).is_file():
        text = (root / PROMPTS_FILE).read_text(encoding="utf-8-sig", errors="replace").splitlines()
        head = next((i for i, line in enumerate(text) if line.strip().lower().startswith("prompts")), len(text))
        for line in text[:head]:
            m = re.fullmatch(r"\s*([\w.-]+)\s*,\s*(.+?)\s*", line)
            if m and m.group(1) != "subject_name":
                classes[m.group(1)] = m.group(2)
        live_at = next((i for i, line in enumerate(text) if "live subject prompts" in line.lower()), len(text))
        object_prompts, live_prompts = _templates(text[head:live_at]), _templates(text[live_at:])
        live_prompts = live_prompts or object_prompts
    elif (root / "prompts.txt").is_file():
        from ..generate.prompts import read_prompt_file

        object_prompts = live_prompts = read_prompt_file(root / "prompts.txt")
        if (root / "classes.txt").is_file():
            for line in (root / "classes.txt").read_text(encoding="utf-8-sig").splitlines():
                if "," in line and not line.startswith("#"):
                    name, cls = line.split(",", 1)
                    classes[name.strip()] = cls.strip()
    else:
        raise UserError(f"--data {data}: no {PROMPTS_FILE} (DreamBench's) or prompts.txt (one template a line, "
                        "{0} the identifier, {1} the class) in it")
    if not object_prompts:
        raise UserError(f"--data {data}: its prompt list holds no template with {{0}}: write prompts like "
                        "'a {0} {1} in the jungle'")
    bad = [p for p in object_prompts + live_prompts if "{0}" not in p]
    if bad:
        raise UserError(f"--data {data}: prompt {bad[0]!r} has no {{0}} (the identifier's place)")
    subjects = [Subject(d.name, classes.get(d.name, d.name.replace("_", " ")), d) for d in sorted(root.iterdir())
                if d.is_dir() and not d.name.startswith(".")]
    if not subjects:
        raise UserError(f"--data {data}: no subject folders in it (one folder of photos per subject)")
    return Bench(subjects, object_prompts, live_prompts)


def fill(template: str, identifier: str, cls: str) -> str:
    return re.sub(r"\s+", " ", template.format(identifier, cls)).strip()


def one_token(tokenizer, word: str) -> bool:
    return len(tokenizer(word, add_special_tokens=False).input_ids) == 1


def self_similarity(embeddings: torch.Tensor) -> float | None:
    """Mean cosine over ordered pairs of different images (None for fewer than two)."""
    n = len(embeddings)
    if n < 2:
        return None
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    sims = e @ e.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def evaluate_dreambench(pipe, data: str | Path, *, method: str = "ti", clip: str | ClipScorer | None = None,
                        dino: str | DinoScorer | None = None, out_dir: str | Path = "outputs/dreambench",
                        subjects: list[str] | None = None, prompts: int | None = None, images_per_prompt: int = 4,
                        train_steps: int | None = None, lr: float | None = None, steps: int = 50,
                        guidance_scale: float = 7.5, scheduler: str = "ddim", seed: int = 0,
                        model_name: str = "", progress: bool = True) -> dict:
    """The protocol (module docstring) with `pipe` as the base model; returns per-image rows, per-subject and
    overall means with standard errors, the real-images row and the settings. Writes every image (with its
    settings in the PNG) under `out_dir/<subject>/images`, the learned concept under `out_dir/<subject>/<method>`."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    bench = read_dreambench(data)
    chosen = bench.subjects
    if subjects:
        names = {s.name: s for s in bench.subjects}
        missing = [n for n in subjects if n not in names]
        if missing:
            raise UserError(f"no subject {missing[0]!r} in {data}: pass some of {', '.join(names)}")
        chosen = [names[n] for n in subjects]
    references = {s.name: read_rgb(image_paths(s.folder, f"subject {s.name}:"), f"subject {s.name}:") for s in chosen}
    clip = ClipScorer(clip) if isinstance(clip, (str, os.PathLike)) and clip else clip or None
    dino = DinoScorer(dino) if isinstance(dino, (str, os.PathLike)) and dino else dino or None
    if clip is None and dino is None:
        raise UserError("no scoring model: pass --clip FOLDER (CLIP-I, CLIP-T) and/or --dino FOLDER (DINO)")
    out = Path(out_dir)
    rows, per_subject, real = [], {}, {"clip_i": [], "dino": []}
    seconds = {"learn": 0.0, "generate": 0.0}
    for subject in chosen:
        templates = bench.prompts(subject)[:prompts] if prompts else bench.prompts(subject)
        t0 = time.perf_counter()
        identifier, cleanup = learn_subject(pipe, subject, method, out / subject.name / method, train_steps, lr,
                                            seed, model_name, progress)
        seconds["learn"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            from ..generate.images import generate

            made = generate(pipe, [fill(t, identifier, subject.cls) for t in templates], seed=seed,
                            num_images=images_per_prompt, steps=steps, guidance_scale=guidance_scale,
                            scheduler=scheduler, out_dir=out / subject.name / "images", progress=progress)
        finally:
            cleanup()
        seconds["generate"] += time.perf_counter() - t0
        plain = [fill(t, "", subject.cls) for t in templates for _ in range(images_per_prompt)]
        scores = score(made.images, plain, references[subject.name], clip=clip, dino=dino, progress=progress)
        mine = [{"subject": subject.name, "class": subject.cls, "prompt": p, "scored_prompt": q, "seed": s,
                 "file": str(path.relative_to(out)), **row}
                for p, q, s, path, row in zip(made.prompts, plain, made.seeds, made.paths, scores)]
        rows += mine
        per_subject[subject.name] = summarise(mine)
        for key, scorer in (("clip_i", clip), ("dino", dino)):
            if scorer is not None:
                real[key].append(self_similarity(torch.cat([scorer.images([im]) for im in references[subject.name]])))
    result = {"kind": "dreambench", "method": method, "images": rows, "means": summarise(rows),
              "subjects": per_subject,
              "real_images": {k: mean_se(v) if v else mean_se([]) for k, v in real.items()},
              "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "settings": {"data": str(data), "model": model_name, "method": method,
                           "subjects": [s.name for s in chosen], "prompts_per_subject": prompts,
                           "images_per_prompt": images_per_prompt, "train_steps": train_steps, "lr": lr,
                           "steps": steps, "guidance_scale": guidance_scale, "scheduler": scheduler, "seed": seed,
                           "clip": getattr(clip, "name", None), "dino": getattr(dino, "name", None)}}
    atomic_write_text(out / "dreambench.json", json.dumps(result, indent=2) + "\n")
    return result


def learn_subject(pipe, subject: Subject, method: str, out: Path, train_steps: int | None, lr: float | None,
                  seed: int, model_name: str, progress: bool):
    """Learn the subject; (the identifier to write in prompts, a function that unloads what was loaded)."""
    overrides = {k: v for k, v in (("steps", train_steps), ("lr", lr)) if v is not None}
    noun = subject.cls.split()[-1]
    if method == "ti":
        from ..learn.textual_inversion import learn_textual_inversion
        from ..learn.ti_config import TIConfig

        token = f"<{re.sub(r'[^A-Za-z0-9_-]', '-', subject.name)}>"
        init = noun if one_token(pipe.tokenizer, noun) else "object" if one_token(pipe.tokenizer, "object") else None
        if token in pipe.tokenizer.get_vocab():  # learned earlier in this process: keep the first
            return token, lambda: None
        cfg = TIConfig(token=token, init_word=init, seed=seed, validation_prompts=(), **overrides)
        learn_textual_inversion(pipe, subject.folder, out, cfg, model_name=model_name, progress=progress)
        return token, lambda: None
    from ..learn.lora import learn_lora
    from ..learn.lora_config import LoRAConfig
    from ..models.lora import load_lora

    cfg = LoRAConfig(trigger="sks", class_word=subject.cls, prompt=f"a photo of sks {subject.cls}", seed=seed,
                     validation_prompts=(), **overrides)
    result = learn_lora(pipe, subject.folder, out, cfg, model_name=model_name, progress=progress)
    name = "dreambench"
    load_lora(pipe, result.path, name)
    pipe.set_adapters([name], [1.0])
    pipe.conceptkit_loras = {name: 1.0}

    def unload():
        pipe.delete_adapters(name)
        pipe.conceptkit_loras = {}

    return "sks", unload


def _cell(summary: dict) -> str:
    from .images import fmt

    return fmt(summary)


def summary_table(result: dict) -> str:
    """The table the papers print: DINO, CLIP-I, CLIP-T (± standard error over images), real images first."""
    names = {"ti": "Textual Inversion", "lora": "LoRA (DreamBooth-style)"}
    m, r = result["means"], result["real_images"]
    return "\n".join(["| method | DINO | CLIP-I | CLIP-T | images |", "|---|---|---|---|---|",
                      f"| real images (this copy of DreamBench) | {_cell(r['dino'])} | {_cell(r['clip_i'])} | — | — |",
                      f"| {names[result['method']]} (this run) | {_cell(m['dino'])} | {_cell(m['clip_i'])} | "
                      f"{_cell(m['clip_t'])} | {len(result['images'])} |"])


def subject_table(result: dict) -> str:
    lines = ["| subject | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|"]
    for name, s in result["subjects"].items():
        lines.append(f"| {name} | {_cell(s['dino'])} | {_cell(s['clip_i'])} | {_cell(s['clip_t'])} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    """The summary table, then one row per subject."""
    return summary_table(result) + "\n\n" + subject_table(result)
