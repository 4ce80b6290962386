"""`conceptkit ui`: a Gradio app with four tabs (Generate, Learn, Compose, ProFusion) over conceptkit.

Generation runs in the request (seconds on the bundled model) through the Python API, and the page shows the
`conceptkit` command that reproduces each picture. Everything longer is a job in the `JobQueue` (ui/jobs.py):
the page only polls it once a second, so a reload, a second browser or a second user sees the same jobs.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import secrets
import sys
import shlex
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from ..errors import UserError, one_line
from ..models.lora import LORA_WEIGHT_NAME
from ..resources import is_out_of_memory, oom_advice
from ..values import SHARE
from .jobs import Job, JobQueue

SCHEDULERS = ["ddim", "dpm++", "euler", "euler-a", "pndm"]
COMPOSE_METHODS = ["clora", "merge", "switch", "composite", "none", "text", "regional"]
# compose's mask options the README recommends (chosen on evaluate clora's tune split)
RECOMMENDED_MASKS = ["--mask-exclusive", "--mask-threshold", "0", "--mask-combine", "sum"]
LEARN_KINDS = ("ti", "lora", "promptnet")
LEARN_METHODS = {"Textual Inversion": "ti", "LoRA": "lora",
                 "LoRA, its trigger learned first as a word (pivotal)": "lora",
                 "PromptNet fine-tune (one image)": "promptnet"}
PIVOTAL_WORD_STEPS = "600"  # the shipped concept LoRAs' recipe (evaluate/clora.py Recipe.trigger_ti_steps)
BUNDLED_LORAS = Path(__file__).resolve().parents[1] / "bundled" / "loras"
BUNDLED_CONCEPTS = Path(__file__).resolve().parents[1] / "bundled" / "concepts"
CONCEPT_OPTIONS = {"lora": "--lora", "embedding": "--embedding", "image": "--image", "words": "--words"}  # per kind
WORDS_PREFIX = "Words: "  # a Compose slot typed as "Words: pink striped cross" is a concept written in words
CSS = """
.ck-bar {height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden; margin: 4px 0}
.ck-bar > div {height: 100%; background: #2563eb}
.ck-error {color: #b91c1c; font-weight: 600}
"""


# ---------------------------------------------------------------- what the pickers offer

def bundled_loras() -> dict[str, str]:
    return {f"{p.stem} (bundled)": str(p) for p in sorted(BUNDLED_LORAS.glob("*.safetensors"))}


def bundled_images() -> dict[str, str]:
    """One image of each bundled concept set: a ProFusion image concept for the Compose tab."""
    folders = sorted(p for p in BUNDLED_CONCEPTS.iterdir() if p.is_dir()) if BUNDLED_CONCEPTS.is_dir() else []
    return {f"{p.name} (bundled)": str(sorted(p.glob("*.png"))[0]) for p in folders if any(p.glob("*.png"))}


def learned(queue: JobQueue, kind: str) -> dict[str, str]:
    """label -> path of each finished job's result: embeddings (ti), LoRA files (lora), PromptNet folders."""
    found = {}
    for job in queue.list():
        if job.status != "done":
            continue
        if kind == "ti" and job.kind == "ti":
            found[f"{job.title} ({job.id})"] = str(job.out)
        elif kind == "lora" and job.kind == "lora":
            found[f"{job.title} ({job.id})"] = str(job.out / LORA_WEIGHT_NAME)
        elif kind == "promptnet" and job.kind in ("promptnet", "profusion"):
            found[f"{job.title} ({job.id})"] = str(job.out if job.kind == "promptnet" else job.out / "promptnet")
    return found


def local_models(models_dir: str | None) -> list[str]:
    """'toy', then the diffusers folders and single-file checkpoints in --models-dir, then cached hub ids."""
    from ..models.loading import hub_cache_dir, is_diffusers_folder

    names = ["toy"]
    if models_dir:
        for p in sorted(Path(models_dir).iterdir()):
            if (p.is_dir() and is_diffusers_folder(p)) or p.suffix in (".safetensors", ".ckpt"):
                names.append(str(p))
    hub = hub_cache_dir()
    if hub.is_dir():
        for repo in sorted(hub.glob("models--*")):
            if any(repo.glob("snapshots/*/model_index.json")):
                names.append(repo.name[len("models--"):].replace("--", "/"))
    return names


# ---------------------------------------------------------------- small renderers

def offered(choices: dict[str, str], label: str) -> str:
    """The path behind a picker's label; anything else (a path typed into the API) is refused."""
    if label not in choices:
        raise ValueError(f"{label!r} is not one of the offered choices: pick one from the list")
    return choices[label]


def slot_concept(choices: dict[str, tuple[str, str]], label: str) -> tuple[str, str]:
    """A Compose slot's (kind, file or text): an offered concept, or words typed as "Words: pink striped cross"
    (text only: it reaches compose as one --words argument, never as a path)."""
    if label.startswith(WORDS_PREFIX):
        text = " ".join(label[len(WORDS_PREFIX):].replace(":", " ").split())
        if not text:
            raise ValueError(f"write the concept after '{WORDS_PREFIX.strip()}', e.g. '{WORDS_PREFIX}pink striped cross'")
        return "words", text
    return offered(choices, label)


def check_images(files: list[str] | None, at_least: int) -> list[Path]:
    """The uploaded files, each checked to be an image; a one-line error otherwise."""
    paths = [Path(f) for f in files or []]
    if len(paths) < at_least:
        raise ValueError(f"upload at least {at_least} image{'s' if at_least > 1 else ''} of the concept "
                         "(PNG, JPEG or WebP)")
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception:
            raise ValueError(f"{p.name} is not an image that can be read: upload PNG, JPEG or WebP files") from None
    return paths


def copy_uploads(files: list[Path], names: list[str]):
    """A job's `prepare`: copies the uploaded files into the job's images/ folder under `names` (Gradio's upload
    cache is not kept)."""
    def prepare(out: Path) -> None:
        (out.parent / "images").mkdir()
        for path, name in zip(files, names):
            shutil.copy(path, out.parent / "images" / name)
    return prepare


def error_html(message: str) -> str:
    return f'<p class="ck-error">Error: {gr_escape(message)}</p>'


def gr_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def progress_html(job: Job | None, ahead: int = 0) -> str:
    if job is None:
        return "<p>No job yet.</p>"
    p = job.progress()
    if job.status == "done":
        percent = 100
    elif p["total"]:
        percent = int(100 * p["step"] / p["total"])
    else:  # no training command (compose) or not started: no percentage until done
        percent = None
    parts = [f"{percent}%"] if percent is not None else []
    if p["total"]:
        parts.append(f"step {p['step']}/{p['total']}")
    if p["it_s"]:
        parts.append(f"{p['it_s']:.1f} it/s")
    if job.status == "running" and p["eta_s"] is not None:
        parts.append(f"ETA {p['eta_s']:.0f} s")
    if job.status == "running" and len(job.commands) > 1:
        parts.append(f"command {job.command_index + 1}/{len(job.commands)}")
    status = job.status
    if job.status == "running" and p["total"] and p["step"] == p["total"] and len(job.commands) == 1:
        status = "finishing (validation images, saving)"
    if job.status == "queued":
        status = f"queued ({ahead} job{'s' if ahead != 1 else ''} ahead)"
    if job.started:
        took = (job.finished or time.time()) - job.started
        status += f" · {took:.0f} s"
    html = (f'<div class="ck-bar"><div style="width:{percent or 0}%"></div></div>'
            f'<p><b>{gr_escape(job.title)}</b>: {" · ".join([*parts, status])}</p>')
    if job.error:
        html += error_html(job.error)
    return html


def commands_md(job: Job | None) -> str:
    if job is None:
        return ""
    return "Reproduce with:\n```bash\n" + "\n".join(job.shell_commands()) + "\n```"


def loss_frame(job: Job | None):
    import pandas as pd

    losses = job.progress()["losses"] if job else []
    return pd.DataFrame({"step": list(range(1, len(losses) + 1)), "loss": losses})


def pngs(folder: Path, pattern: str = "*.png") -> list[str]:
    return [str(p) for p in sorted(folder.glob(pattern))] if folder.is_dir() else []


def validation_images(job: Job) -> list[tuple[str, str]]:
    """Validation grids as they appear: TI/LoRA write validation/step-N/grid.png, PromptNet validation/step-N.png."""
    found = pngs(job.out / "validation", "step-*/grid.png") + pngs(job.out / "validation", "step-*.png")
    return [(p, re.search(r"step-(\d+)", p).group(0)) for p in found]


def job_choices(queue: JobQueue, kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(f"{j.title} · {j.id}", j.id) for j in queue.list(kinds)]


def queue_md(queue: JobQueue) -> str:
    jobs = queue.list()[:10]
    if not jobs:
        return "Queue: empty."
    rows = ["| job | kind | status |", "|---|---|---|"]
    rows += [f"| {gr_escape(j.title)} ({j.id}) | {j.kind} | {j.status} |" for j in jobs]
    return "\n".join(rows)


# ---------------------------------------------------------------- Generate, in the request

@dataclass
class GenerateRequest:
    """One Generate-tab request: `run()` calls the Python API, `argv()` is the `conceptkit` command that does the
    same (free text goes in as --option=value, so a value that starts with '-' stays a value)."""
    model: str
    prompt: str
    negative: str
    seed: int
    steps: int
    guidance: float
    scheduler: str
    num_images: int
    embeddings: list[str]
    loras: list[str]
    promptnet: str | None
    out: Path

    def argv(self) -> list[str]:
        argv = ["generate", "--model", self.model, f"--prompt={self.prompt}", "--seed", str(self.seed), "--steps",
                str(self.steps), "--guidance-scale", f"{self.guidance:g}", "--num-images", str(self.num_images)]
        if self.negative:
            argv += [f"--negative-prompt={self.negative}"]
        argv += [a for e in self.embeddings for a in ("--embedding", e)]
        argv += [a for lora in self.loras for a in ("--lora", lora)]
        if self.promptnet:
            argv += ["--promptnet", self.promptnet]
        elif self.scheduler != "ddim":  # ProFusion's fusion sampling is DDIM's
            argv += ["--scheduler", self.scheduler]
        return argv + ["--out", str(self.out)]

    def run(self) -> None:
        from ..generate.images import generate
        from ..generate.loading import load_embeddings, load_loras
        from ..models.loading import load_pipeline

        pipe = load_pipeline(self.model)
        load_embeddings(pipe, self.embeddings)
        load_loras(pipe, self.loras)
        if self.promptnet:
            from ..profusion.sampling import generate_from_image

            settings = {"guidance_scale": self.guidance, **({"negative_prompt": self.negative} if self.negative else {})}
            generate_from_image(pipe, [self.prompt], promptnet=self.promptnet, steps=self.steps, seed=self.seed,
                                num_images=self.num_images, out_dir=self.out, progress=False, **settings)
        else:
            generate(pipe, [self.prompt], negative_prompt=self.negative or None, seed=self.seed,
                     num_images=self.num_images, steps=self.steps, guidance_scale=self.guidance,
                     scheduler=self.scheduler, out_dir=self.out, progress=False)


# ---------------------------------------------------------------- the app

class UI:
    def __init__(self, queue: JobQueue, work: Path, models: list[str], clip: str | None = None,
                 dino: str | None = None):
        self.queue, self.work, self.models = queue, work, models
        self.clip, self.dino = clip, dino  # `conceptkit ui --clip/--dino`: Learn jobs are scored with them
        self.generate_lock = threading.Lock()

    def progress(self, job: Job | None) -> str:
        return progress_html(job, self.queue.position(job) if job is not None and job.status == "queued" else 0)

    # Generate: in the request, through the Python API; the page shows the command that does the same
    def generate(self, model, prompt, negative, seed, steps, guidance, scheduler, num_images, embeddings, loras,
                 promptnet):
        if not prompt.strip():
            return [], error_html("write a prompt first")
        out = self.work / "generate" / (time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])  # one per request
        try:
            self.check_model(model)
            embedding_files = [offered(learned(self.queue, "ti"), e) for e in embeddings or []]
            lora_files = [offered(self.loras(), name) for name in loras or []]
            promptnet_folder = offered(learned(self.queue, "promptnet"), promptnet) if promptnet else None
        except ValueError as e:
            return [], error_html(str(e))
        request = GenerateRequest(model, prompt, negative.strip(), int(seed), int(steps), float(guidance),
                                  scheduler, int(num_images), embedding_files, lora_files, promptnet_folder, out)
        with self.generate_lock, contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            began = time.perf_counter()
            try:
                request.run()
            except UserError as e:
                return [], error_html(one_line(e))
            except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
                if not is_out_of_memory(e):
                    raise
                return [], error_html(oom_advice("generate", e))
            seconds = time.perf_counter() - began
        images = [p for p in pngs(out) if not p.endswith("grid.png")]
        return images, (f"{len(images)} image(s) in {seconds:.1f} s, saved in `{out}`. Reproduce with:\n"
                        f"```bash\n{shlex.join(['conceptkit', *request.argv()])}\n```")

    def loras(self) -> dict[str, str]:
        return {**bundled_loras(), **learned(self.queue, "lora")}

    def concepts(self) -> dict[str, tuple[str, str]]:
        """What a Compose slot can hold, label -> (kind, file): LoRAs, learned embeddings, images (ProFusion, with
        the bundled PromptNet)."""
        out = {f"LoRA: {label}": ("lora", path) for label, path in self.loras().items()}
        out.update({f"Embedding: {label}": ("embedding", path) for label, path in learned(self.queue, "ti").items()})
        out.update({f"Image: {label}": ("image", path) for label, path in bundled_images().items()})
        return out

    def check_model(self, model: str) -> None:
        """Only the models the picker offers: the page (or anyone calling its API) cannot make the server read
        an arbitrary path."""
        if model not in self.models:
            raise ValueError(f"model {model!r} is not one of the offered models: start the UI with --models-dir "
                             "FOLDER to offer your checkpoints")

    def pickers(self):
        return (gr.update(choices=list(learned(self.queue, "ti"))),
                gr.update(choices=list(self.loras())),
                gr.update(choices=["", *learned(self.queue, "promptnet")]))

    # Learn: a job
    def start_learn(self, model, method, files, name, word, steps, validate_every):
        kind = LEARN_METHODS.get(method)
        try:
            self.check_model(model)
            if kind is None:
                raise ValueError(f"unknown method {method!r}: pick one of {', '.join(LEARN_METHODS)}")
            images = check_images(files, 1)
            if kind != "promptnet" and not name.strip():
                raise ValueError("write the new token (Textual Inversion) or trigger word (LoRA) first")
        except ValueError as e:
            return gr.update(), error_html(str(e))
        copy_images = copy_uploads(images, [f"{i:02d}{p.suffix.lower()}" for i, p in enumerate(images)])
        steps, every = str(int(steps)), str(int(validate_every))
        common = ["--model", model, "--steps", steps, "--validate-every", every, "--out", "{out}",
                  "--progress-log", "{progress}"]
        if kind == "ti":
            title = f"Textual Inversion {name.strip()}"
            command = ["learn", "ti", "--images", "{folder}/images", f"--token={name.strip()}",
                       f"--init-word={word.strip() or 'object'}", *common]
        elif kind == "lora":
            title = f"LoRA {name.strip()}"
            phrase = f"{name.strip()} {word.strip()}".strip()
            command = ["learn", "lora", "--images", "{folder}/images", f"--trigger={name.strip()}",
                       f"--prompt=a {phrase}", *common]
            if word.strip():
                command += [f"--class-word={word.strip()}"]
            if "pivotal" in method:  # the trigger must be a new token, e.g. <sks>
                command += ["--pivotal-steps", PIVOTAL_WORD_STEPS]
        else:
            title = f"PromptNet {images[0].stem}"
            command = ["learn", "promptnet", "--finetune", "--image", f"{{folder}}/images/00{images[0].suffix.lower()}",
                       *common]
        commands = [command]
        if kind in ("ti", "lora") and (self.clip or self.dino):  # the final validation images against the uploads
            commands.append(["evaluate", "images", "--images", f"{{out}}/validation/step-{int(steps):06d}",
                             "--reference", "{folder}/images", *(["--clip", self.clip] if self.clip else []),
                             *(["--dino", self.dino] if self.dino else []), "--json", f"{{out}}/{SCORES_FILE}"])
        job = self.queue.submit(kind, title, commands, prepare=copy_images)
        return (gr.update(choices=job_choices(self.queue, LEARN_KINDS), value=job.id),
                f"Queued {title} ({job.id}).")

    def learn_panel(self, job_id):
        job = self.queue.get(job_id)
        result = ""
        if job is not None and job.status == "done":
            where = {"ti": "Embeddings", "lora": "LoRAs", "promptnet": "PromptNet"}[job.kind]
            result = f"Done: saved in `{job.out}`. It is now in the Generate tab's **{where}** picker."
            result += scores_md(job.out / SCORES_FILE)
        grids = validation_images(job) if job else []
        latest = gr.update(value=grids[-1][0], label=f"Validation images at {grids[-1][1]} (prompt x seeds)") \
            if grids else gr.update(value=None, label="Validation images")
        return (self.progress(job), loss_frame(job), latest,
                result + "\n\n" + commands_md(job))

    # Compose: a job
    def start_compose(self, model, template, n1, c1, n2, c2, n3, c3, methods, steps, seed, w1=1.0, w2=1.0, w3=1.0,
                      recommended_masks=True, temperature=0.5, text_encoder_lora=True, lora_end=1.0):
        try:
            self.check_model(model)
            slots = [(n.strip(), slot_concept(self.concepts(), c), w)
                     for n, c, w in ((n1, c1, w1), (n2, c2, w2), (n3, c3, w3)) if n.strip() and c]
            if any(not (isinstance(w, (int, float)) and 0 <= w <= 100) for *_, w in slots):
                raise ValueError("a concept weight must be a number from 0 to 100 (1: the LoRA as trained)")
            if not (isinstance(temperature, (int, float)) and temperature > 0):
                raise ValueError("the temperature must be a number above 0 (0.5: the paper's)")
            try:
                SHARE.check(lora_end)
            except ValueError:
                raise ValueError(f"the LoRA end must be {SHARE.describe()} (1: every step)") from None
        except ValueError as e:
            return gr.update(), error_html(str(e))
        if len(slots) < 2:
            return gr.update(), error_html("pick two concepts and name their slots (the {names} in the prompt)")
        missing = [n for n, *_ in slots if "{" + n + "}" not in template]
        if missing:
            return gr.update(), error_html(f"the prompt has no {{{missing[0]}}} slot: write it where that concept "
                                           "goes, e.g. 'a {a} on the left and a {b} on the right'")
        if not methods:
            return gr.update(), error_html("tick at least one method")
        command = ["compose", "--model", model, f"--prompt={template}"]
        command += [a for n, (kind, path), w in slots
                    for a in (CONCEPT_OPTIONS[kind], f"{n}={path}" + (f"@{float(w):g}" if kind == "lora" and w != 1 else ""))]
        command += ["--method", ",".join(methods), "--steps", str(int(steps)), "--seed", str(int(seed)),
                    "--temperature", f"{float(temperature):g}", *(RECOMMENDED_MASKS if recommended_masks else []),
                    *([] if text_encoder_lora else ["--no-text-encoder-lora"]),
                    *([] if lora_end == 1 else ["--lora-end", f"{float(lora_end):g}"]), "--save-maps", "--out", "{out}"]
        job = self.queue.submit("compose", f"Compose {' + '.join(n for n, *_ in slots)}", [command])
        return gr.update(choices=job_choices(self.queue, ("compose",)), value=job.id), f"Queued ({job.id})."

    def compose_panel(self, job_id):
        job = self.queue.get(job_id)
        if job is None:
            return progress_html(None), [], None, None, ""
        methods = job.commands[0][job.commands[0].index("--method") + 1].split(",")
        images = [(p, m) for m in methods for p in pngs(job.out / m, "s*.png") if re.search(r"/s\d+\.png$", p)]
        attention = next(iter(pngs(job.out / "clora", "s*-attention.png")), None)
        masks = next(iter(pngs(job.out / "clora", "s*-masks.png")), None)
        return self.progress(job), images, attention, masks, commands_md(job)

    # ProFusion: a job of three commands
    def start_profusion(self, model, image, prompt, steps, sample_steps, seed, extra_images=None, extra_weight=1.0,
                        start_timestep=0):
        """`extra_images`: more images of the object (generate --extra-image, each at `extra_weight`);
        `start_timestep` 1-999: sample from the reference noised to it (generate --start-timestep; 0: off)."""
        try:
            self.check_model(model)
            (path,) = check_images([image] if image else [], 1)
            extras = check_images(extra_images, 0)
        except ValueError as e:
            return gr.update(), error_html(str(e))
        if "S*" not in prompt:
            return gr.update(), error_html("the prompt must say S* where the uploaded object goes, "
                                           "e.g. 'a small S* on the left, on a navy background'")
        weight, start = float(extra_weight or 0), int(start_timestep or 0)
        if extras and not (math.isfinite(weight) and 0 < weight <= 100):
            return gr.update(), error_html("the extra images' weight must be a number > 0 (1: as much as the "
                                           "guidance of one image)")
        if not 0 <= start <= 999:
            return gr.update(), error_html("the start timestep must be 1-999 (0: start from noise)")
        names = [f"reference{path.suffix.lower()}"] + [f"extra-{i}{p.suffix.lower()}" for i, p in enumerate(extras)]
        copy_image = copy_uploads([path, *extras], names)
        reference = f"{{folder}}/images/{names[0]}"
        gen = ["generate", "--model", model, "--promptnet", "{out}/promptnet", f"--prompt={prompt}",
               "--seed", str(int(seed)), "--steps", str(int(sample_steps))]
        for name in names[1:]:
            gen += ["--extra-image", f"{{folder}}/images/{name}:{weight:g}"]
        if start:
            gen += ["--start-timestep", str(start)]
        commands = [["learn", "promptnet", "--finetune", "--model", model, "--image", reference,
                     "--steps", str(int(steps)), "--out", "{out}/promptnet", "--progress-log", "{progress}"],
                    [*gen, "--fusion", "--out", "{out}/fusion"],
                    [*gen, "--no-fusion", "--out", "{out}/plain"]]
        job = self.queue.submit("profusion", f"ProFusion {path.stem}", commands, prepare=copy_image)
        return gr.update(choices=job_choices(self.queue, ("profusion",)), value=job.id), f"Queued ({job.id})."

    def profusion_panel(self, job_id):
        job = self.queue.get(job_id)
        if job is None:
            return progress_html(None), None, None, None, ""
        reference = next(iter(Path(job.folder, "images").glob("reference.*")), None)
        fusion = next((p for p in pngs(job.out / "fusion") if not p.endswith("grid.png")), None)
        plain = next((p for p in pngs(job.out / "plain") if not p.endswith("grid.png")), None)
        return self.progress(job), str(reference) if reference else None, fusion, plain, commands_md(job)

    # one timer refreshes every panel; a panel whose job did not change is skipped (no image flicker)
    def tick(self, learn_id, compose_id, profusion_id, seen):
        seen = dict(seen or {})
        out = []
        for key, job_id, panel in (("learn", learn_id, self.learn_panel),
                                   ("compose", compose_id, self.compose_panel),
                                   ("profusion", profusion_id, self.profusion_panel)):
            job = self.queue.get(job_id)
            sig = None if job is None else (job.id, job.status, job.progress()["step"], job.command_index,
                                            len(list(job.out.rglob("*.png"))))
            values = list(panel(job_id))
            if job is not None and seen.get(key) == sig:  # the progress line always (elapsed time), the rest
                values[1:] = [gr.skip()] * (len(values) - 1)  # only when something changed
            out += values
            seen[key] = sig
        return [*out, queue_md(self.queue), seen]


def newest(queue: JobQueue, kinds: tuple[str, ...]) -> str | None:
    jobs = queue.list(kinds)
    return jobs[0].id if jobs else None


SCORES_FILE = "scores.json"


def scores_md(path: Path) -> str:
    """A finished Learn job's CLIP/DINO scores (`evaluate images` on its final validation images), if it has them."""
    if not path.is_file():
        return ""
    from ..evaluate.images import table

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ("\n\n**Scores** of the final validation images against your uploads (CLIP-I and DINO: mean cosine "
                "over every pair; CLIP-T: image vs its prompt; ± standard error):\n\n" + table(data))
    except (ValueError, KeyError, TypeError):
        return f"\n\n(scores file {path.name} is unreadable)"


def build_app(queue: JobQueue, work: str | Path, models: list[str], clip: str | None = None,
              dino: str | None = None) -> gr.Blocks:
    ui = UI(queue, Path(work), models, clip, dino)
    with gr.Blocks(title="conceptkit", analytics_enabled=False) as app:
        gr.Markdown("# conceptkit\nTeach a text-to-image model new concepts, compose them, and keep an image's "
                    "detail (Textual Inversion, CLoRA, ProFusion).")
        model = gr.Dropdown(models, value=models[0], label="Model",
                            info="'toy' is the bundled shapes-world model; `conceptkit ui --models-dir FOLDER` "
                                 "offers your checkpoints; cached hub ids are listed too")
        with gr.Tab("Generate", id="generate") as generate_tab:
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox("a large red striped circle in the center, on a navy background",
                                        label="Prompt", elem_id="generate-prompt")
                    negative = gr.Textbox("", label="Negative prompt")
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0)
                        steps = gr.Slider(1, 100, 30, step=1, label="Steps")
                        guidance = gr.Slider(1, 15, 7.5, step=0.5, label="Guidance")
                    with gr.Row():
                        scheduler = gr.Dropdown(SCHEDULERS, value="ddim", label="Scheduler")
                        num_images = gr.Slider(1, 8, 2, step=1, label="Images")
                    embeddings = gr.Dropdown([], multiselect=True, label="Embeddings (learned tokens)")
                    loras = gr.Dropdown(list(bundled_loras()), multiselect=True, label="LoRAs")
                    promptnet = gr.Dropdown([""], value="", label="PromptNet (ProFusion; prompt says S*)")
                    go = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    gallery = gr.Gallery(label="Results", elem_id="generate-gallery", format="png", columns=2)
                    generate_info = gr.Markdown(elem_id="generate-info")
            go.click(ui.generate, [model, prompt, negative, seed, steps, guidance, scheduler, num_images,
                                   embeddings, loras, promptnet], [gallery, generate_info], api_name="generate")
            generate_tab.select(ui.pickers, None, [embeddings, loras, promptnet], queue=False)

        with gr.Tab("Learn", id="learn"):
            with gr.Row():
                with gr.Column():
                    method = gr.Radio(list(LEARN_METHODS), value="Textual Inversion", label="Method")
                    files = gr.File(file_count="multiple", label="Images of the concept (3-5; one for PromptNet)",
                                    elem_id="learn-files")
                    with gr.Row():
                        name = gr.Textbox("<my-concept>", label="New token / LoRA trigger", elem_id="learn-name")
                        word = gr.Textbox("object", label="Init word / class word")
                    with gr.Row():
                        learn_steps = gr.Number(200, label="Steps", precision=0, elem_id="learn-steps")
                        validate_every = gr.Number(100, label="Validate every", precision=0)
                    with gr.Row():
                        start = gr.Button("Start", variant="primary", elem_id="learn-start")
                        cancel = gr.Button("Cancel", elem_id="learn-cancel")
                    learn_msg = gr.HTML(elem_id="learn-message")
                with gr.Column():
                    learn_job = gr.Dropdown(job_choices(queue, LEARN_KINDS), value=None, label="Job")
                    learn_progress = gr.HTML(elem_id="learn-progress")
                    loss_plot = gr.LinePlot(x="step", y="loss", label="Loss", height=220)
                    validation = gr.Image(label="Validation images", elem_id="learn-validation", format="png",
                                          type="filepath", height=260)
                    learn_result = gr.Markdown(elem_id="learn-result")
            start.click(ui.start_learn, [model, method, files, name, word, learn_steps, validate_every],
                        [learn_job, learn_msg])
            cancel.click(lambda job_id: queue.cancel(job_id) if job_id else None, learn_job, None, queue=False)

        with gr.Tab("Compose", id="compose") as compose_tab:
            names = list(ui.concepts())
            with gr.Row():
                with gr.Column():
                    template = gr.Textbox("a {a} on the left and a {b} on the right, on a gray background",
                                          label="Prompt with a {slot} per concept", elem_id="compose-prompt")
                    slots = []
                    for i, (slot, default) in enumerate((("a", names[0] if names else None),
                                                         ("b", names[1] if len(names) > 1 else None),
                                                         ("", None))):
                        with gr.Row():
                            slots.append(gr.Textbox(slot, label=f"Slot {i + 1}", scale=1))
                            slots.append(gr.Dropdown(names, value=default, label=f"Concept {i + 1} (LoRA, "
                                                     f"embedding or image; or type '{WORDS_PREFIX}pink striped "
                                                     "cross')", allow_custom_value=True, scale=3))
                    methods = gr.CheckboxGroup(COMPOSE_METHODS, value=["clora", "merge"],
                                               label="Methods (CLoRA and the baselines)")
                    with gr.Row():
                        compose_steps = gr.Number(30, label="Steps", precision=0)
                        compose_seed = gr.Number(0, label="Seed", precision=0)
                    with gr.Row():
                        weights = [gr.Number(1.0, label=f"LoRA weight {i + 1}") for i in range(3)]
                    with gr.Row():
                        recommended_masks = gr.Checkbox(True, label="Exclusive masks (recommended; off: the paper's)")
                        temperature = gr.Number(0.5, label="Temperature τ")
                        text_encoder_lora = gr.Checkbox(True, label="LoRAs on the text encoder too")
                        lora_end = gr.Number(1.0, label="LoRA end: the share of the run the LoRAs act on (1: all)")
                    compose_go = gr.Button("Compose", variant="primary", elem_id="compose-button")
                    compose_msg = gr.HTML(elem_id="compose-message")
                with gr.Column():
                    compose_job = gr.Dropdown(job_choices(queue, ("compose",)), value=None, label="Job")
                    compose_progress = gr.HTML(elem_id="compose-progress")
                    composed = gr.Gallery(label="Images (one per method)", elem_id="compose-gallery", format="png",
                                          columns=3)
                    with gr.Row():
                        attention = gr.Image(label="CLoRA attention maps (rows: steps; columns: concepts)",
                                             elem_id="compose-attention", format="png", type="filepath")
                        masks = gr.Image(label="CLoRA masks (rows: steps; columns: branches)",
                                         elem_id="compose-masks", format="png", type="filepath")
                    compose_cmds = gr.Markdown()
            compose_tab.select(lambda: [gr.update(choices=list(ui.concepts()))] * 3, None, slots[1::2], queue=False)
            compose_go.click(ui.start_compose, [model, template, *slots, methods, compose_steps, compose_seed, *weights,
                                                recommended_masks, temperature, text_encoder_lora, lora_end],
                             [compose_job, compose_msg])

        with gr.Tab("ProFusion", id="profusion"):
            with gr.Row():
                with gr.Column():
                    reference_in = gr.Image(label="One image of the object", type="filepath",
                                            elem_id="profusion-image", sources=["upload"], height=220)
                    pf_prompt = gr.Textbox("a small S* on the left, on a navy background", label="Prompt (S* is "
                                           "the object)", elem_id="profusion-prompt")
                    with gr.Row():
                        pf_steps = gr.Number(100, label="Fine-tune steps", precision=0, elem_id="profusion-steps")
                        pf_sample_steps = gr.Number(30, label="Sampling steps", precision=0,
                                                    elem_id="profusion-sample-steps")
                        pf_seed = gr.Number(0, label="Seed", precision=0)
                    with gr.Accordion("More (optional)", open=False):
                        pf_extra = gr.File(file_count="multiple", label="More images of the object (each adds its "
                                           "word to fusion sampling)", elem_id="profusion-extra",
                                           file_types=["image"])
                        with gr.Row():
                            pf_extra_weight = gr.Number(1.0, label="Their weight", elem_id="profusion-extra-weight")
                            pf_start = gr.Number(0, label="Start timestep (0: from noise; 1-999: from the noised "
                                                 "reference, which keeps its layout)", precision=0,
                                                 elem_id="profusion-start-timestep")
                    pf_go = gr.Button("Fine-tune and generate", variant="primary", elem_id="profusion-button")
                    pf_msg = gr.HTML(elem_id="profusion-message")
                with gr.Column():
                    pf_job = gr.Dropdown(job_choices(queue, ("profusion",)), value=None, label="Job")
                    pf_progress = gr.HTML(elem_id="profusion-progress")
                    with gr.Row():
                        pf_reference = gr.Image(label="Reference", type="filepath", format="png", height=220)
                        pf_fusion = gr.Image(label="With fusion sampling", type="filepath", format="png", height=220,
                                             elem_id="profusion-fusion")
                        pf_plain = gr.Image(label="Without fusion", type="filepath", format="png", height=220,
                                            elem_id="profusion-plain")
                    pf_cmds = gr.Markdown()
            pf_go.click(ui.start_profusion, [model, reference_in, pf_prompt, pf_steps, pf_sample_steps, pf_seed,
                                             pf_extra, pf_extra_weight, pf_start], [pf_job, pf_msg])

        queue_view = gr.Markdown(queue_md(queue), elem_id="queue")
        seen = gr.State({})
        timer = gr.Timer(1.0)
        timer.tick(ui.tick, [learn_job, compose_job, pf_job, seen],
                   [learn_progress, loss_plot, validation, learn_result,
                    compose_progress, composed, attention, masks, compose_cmds,
                    pf_progress, pf_reference, pf_fusion, pf_plain, pf_cmds, queue_view, seen],
                   queue=False, show_progress="hidden")
        # a reload (or a new visitor) picks up the newest job of each tab, running or not
        app.load(lambda: [gr.update(choices=job_choices(queue, k), value=newest(queue, k))
                          for k in (LEARN_KINDS, ("compose",), ("profusion",))],
                 None, [learn_job, compose_job, pf_job], queue=False)
    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(host: str = "127.0.0.1", port: int = 7860, model: str = "toy", work: str = "outputs/ui",
          models_dir: str | None = None, token: str | None = None, max_upload_mb: int = 50, block: bool = True,
          clip: str | None = None, dino: str | None = None):
    """Start the app; returns (app, queue) when block is False (tests).

    Safety: only this machine can connect unless `host` says otherwise, and then a token is required (visitors log
    in with it). The server reads and writes only inside `work` (jobs, generated images, uploads: Gradio's upload
    cache is moved there), the bundled files and the offered models; uploads are limited to `max_upload_mb`.
    """
    if host not in LOOPBACK and not token:
        raise UserError(f"--host {host} lets other machines reach the UI: also pass --token SECRET (or set "
                        "CONCEPTKIT_UI_TOKEN); visitors log in with it")
    work_path = Path(work).resolve()
    os.environ["GRADIO_TEMP_DIR"] = str(work_path / "uploads")  # read by Gradio when the app is built
    queue = JobQueue(work_path / "jobs")
    models = local_models(models_dir)
    if model not in models:
        models.insert(0, model)
    else:
        models.remove(model)
        models.insert(0, model)
    if clip or dino:  # a wrong folder fails now, in one line, not in every job
        from ..evaluate.similarity import resolve_weights

        clip = str(resolve_weights(clip, "--clip")) if clip else None
        dino = str(resolve_weights(dino, "--dino")) if dino else None
    app = build_app(queue, work_path, models, clip, dino)
    app.queue(default_concurrency_limit=1)
    if block:
        print(f"conceptkit UI on http://{host}:{port} (jobs, outputs and uploads in {work_path}); Ctrl+C stops it",
              file=sys.stderr)
    auth = None
    if token:
        def auth(user: str, password: str) -> bool:
            return secrets.compare_digest(password.encode(), token.encode())
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, allowed_paths=[str(work_path)],
               quiet=not block, css=CSS, footer_links=[], show_error=False, auth=auth,
               auth_message="Log in with any user name and the UI's token as the password.",
               max_file_size=f"{max_upload_mb}mb")
    return app, queue
