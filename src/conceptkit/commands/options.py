"""Options several commands share: the model, the sampler, a progress log; and what they mean. Also the argparse
`type=` checks every option goes through, so a bad value ends at parse time, before anything loads, in one line:
`error: --steps 0: pass an integer from 1 to 1,000,000,000` (cli.py's parser prints it; ranges: conceptkit/values.py).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

from .. import values
from ..errors import UserError

# argparse puts "argument --steps: " before a type check's message; cli.py's parser turns the pair into
# "--steps VALUE: what to pass" when the message starts with this mark (argparse's own messages keep their colon)
VALUE_MARK = "\x00"


def _refuse(text: str, what: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{VALUE_MARK}{shlex.quote(text)}: {what}")


def number(rule: values.Number):
    """An argparse type for a number in `rule`'s range."""
    def parse(text: str):
        try:
            return rule.parse(text)
        except ValueError as e:
            raise _refuse(text, str(e)) from None
    parse.__name__ = "number"
    parse.rule = rule  # for tests and --help readers
    return parse


count = number(values.COUNT)
count_or_zero = number(values.COUNT_OR_ZERO)
seed = number(values.SEED)
size = number(values.SIZE)
rate = number(values.RATE)
probability = number(values.PROBABILITY)
share = number(values.SHARE)
guidance_scale = number(values.GUIDANCE)
weight = number(values.WEIGHT)
small_weight = number(values.SMALL_WEIGHT)
positive = number(values.POSITIVE)
eta = number(values.ETA)
threads = number(values.THREADS)
vectors = number(values.VECTORS)
rank = number(values.RANK)
port = number(values.PORT)
attn_res = number(values.Number(int, 1, 1024))
objects = number(values.Number(int, 1, 8))  # evaluate profusion's held-out test objects
upload_mb = number(values.Number(int, 1, 1_000_000))


def text(what: str = "a non-empty value"):
    """An argparse type for a non-empty string (names, paths, prompts): '' or blanks are refused."""
    def parse(value: str) -> str:
        if not value.strip():
            raise _refuse(value, f"pass {what}")
        return value
    parse.__name__ = "text"
    return parse


path = text("a path")
name = text("a non-empty name")
prompt = text("a non-empty prompt")


def caption(value: str) -> str:
    """An argparse type for a caption that names S* once (`learn promptnet --finetune --caption`)."""
    try:
        return values.check_placeholder_text(prompt(value))
    except ValueError as e:
        raise _refuse(value, str(e)) from None


names = text("comma-separated names")


spec = text("NAME=FILE[:...]")


def key_value(value: str) -> str:
    if "=" not in value or not value.partition("=")[0].strip():
        raise _refuse(value, "pass KEY=VALUE")
    return value


def sweep(value: str) -> str:
    """evaluate profusion --sweep KEY=V1,V2,...: the key and each value checked here (evaluate/profusion_sweep.py);
    kept as text, the command builds the grid of every --sweep."""
    from ..evaluate.profusion_sweep import parse_one

    try:
        parse_one(value)
    except ValueError as e:
        raise _refuse(value, str(e)) from None
    return value


def step_list(value: str) -> str:
    """Step numbers separated by commas ('' for none); kept as text (compose_config reads it)."""
    if not all(v.strip().isdigit() for v in value.split(",") if v.strip()) or len(value) > 10_000:
        raise _refuse(value, "pass step numbers separated by commas, e.g. 0,10,20 ('' for none)")
    return value


def device(value: str) -> str:
    """auto, cpu, cuda, cuda:N, mps: checked here so a typo does not wait for the model to load."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?|mps", value):
        raise _refuse(value, "pass auto, cpu, cuda, cuda:N or mps")
    return value


def scheduler(value: str) -> str:
    if value.lower() not in values.SCHEDULER_NAMES:
        raise _refuse(value, f"pass one of {', '.join(values.SCHEDULER_NAMES)}")
    return value.lower()


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toy", type=path,
                   help="'toy' (bundled), a diffusers folder, a .safetensors/.ckpt file (with --config), "
                        "or a hub id already in the local Hugging Face cache")
    p.add_argument("--config", type=path, help="for a single-file checkpoint: a local diffusers folder (or cached hub id) "
                                    "whose configs describe it")
    p.add_argument("--device", default="auto", type=device, help="auto (CUDA when available), cpu, cuda, cuda:1, ...")


def add_sampling(p: argparse.ArgumentParser, steps: int = 30, guidance: float | None = 7.5,
                 guidance_help: str | None = None) -> None:
    p.add_argument("--steps", type=count, default=steps)
    p.add_argument("--guidance-scale", type=guidance_scale, default=guidance, help=guidance_help)
    p.add_argument("--scheduler", default="ddim", type=scheduler, help="ddim, dpm++, euler, euler-a, pndm")


def add_progress_log(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress-log", metavar="FILE", type=path, help="append one JSON line per step (step, total, loss, "
                                                          "seconds) to FILE, for another program to follow the run")


def progress_log(args, total: int):
    """--progress-log FILE: an on_step(step, loss) callback appending one JSON line per step ({"step", "total",
    "loss", "seconds"}), flushed at once, so another process (the web UI) can follow the run; None without it."""
    if not getattr(args, "progress_log", None):
        return None
    import time

    path = Path(args.progress_log)
    path.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "total": total, "loss": round(loss, 6),
                                "seconds": round(time.perf_counter() - began, 3)}) + "\n")
    return on_step


def refuse_finished_run(out: str, resume: bool, result_file: str) -> None:
    """A finished run whose checkpoints were deleted would be overwritten silently: refuse (the trainers refuse a run
    that still has checkpoints)."""
    if not resume and (Path(out) / result_file).exists() and not any((Path(out) / "checkpoints").glob("step-*")):
        raise UserError(f"{out} already holds a finished run ({result_file}): pass a new --out folder (nothing in "
                        f"{out} was changed)")
