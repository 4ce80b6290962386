"""Options several commands share: the model, the sampler, a progress log; and what they mean."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toy",
                   help="'toy' (bundled), a diffusers folder, a .safetensors/.ckpt file (with --config), "
                        "or a hub id already in the local Hugging Face cache")
    p.add_argument("--config", help="for a single-file checkpoint: a local diffusers folder (or cached hub id) "
                                    "whose configs describe it")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")


def add_sampling(p: argparse.ArgumentParser, steps: int = 30, guidance: float = 7.5) -> None:
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--guidance-scale", type=float, default=guidance)
    p.add_argument("--scheduler", default="ddim", help="ddim, dpm++, euler, euler-a, pndm")


def add_progress_log(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress-log", metavar="FILE", help="append one JSON line per step (step, total, loss, "
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
