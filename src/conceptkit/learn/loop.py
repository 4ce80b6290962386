"""What every conceptkit trainer shares: the step loop and its resumable, atomic checkpoints.

A step draws all its randomness from a generator seeded by (seed, step) (`step_generator`), so a run resumed from
a checkpoint takes exactly the steps an uninterrupted run takes. A checkpoint holds the trained tensors, Adam's
moments and step for each, and the losses so far, in one safetensors file written atomically.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import UserError
from ..files import atomic_write, atomic_write_text, remove_interrupted_writes
from .distributed import Processes


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def save_checkpoint(folder: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    losses: list[float], extra: dict[str, torch.Tensor] | None = None) -> Path:
    """`extra`: more state of the run by name (an EMA of the weights, a loss scaler's), saved as it is."""
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in (extra or {}).items()}
    for name, p in params.items():
        tensors[f"param/{name}"] = p.detach().cpu().clone().contiguous()
        state = optimizer.state.get(p, {})
        if state:
            tensors[f"exp_avg/{name}"] = state["exp_avg"].detach().cpu().contiguous()
            tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].detach().cpu().contiguous()
            tensors[f"adam_step/{name}"] = state["step"].detach().cpu().reshape(1).float()
    meta = {"step": str(step), "losses": json.dumps(losses)}
    return atomic_write(folder / f"step-{step:06d}.safetensors", lambda p: save_file(tensors, p, metadata=meta))


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*.safetensors"))
    return found[-1] if found else None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], int, list[float]]:
    """(every tensor of the checkpoint, its step, the losses so far)."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return load_file(path), int(meta["step"]), json.loads(meta["losses"])


def trained_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint, by name (without Adam's state)."""
    return {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("param/")}


# settings a run may change when it is resumed (gradient checkpointing recomputes the same activations: the steps
# do not change)
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "validate_every", "keep_checkpoints", "conceptkit",
                     "gradient_checkpointing")
# what a setting missing from an older run's config.json was
SETTING_DEFAULTS = {"processes": 1, "mixed_precision": "no", "ema_decay": None, "crop": "squash"}


def check_same_settings(out: Path, config: dict, saved: dict) -> None:
    """Refuse to resume the run in `out` (its settings: `saved`) with other settings than `config`."""
    changed = [k for k in config if k not in RESUMABLE_CHANGES
               and json.loads(json.dumps(config[k])) != saved.get(k, SETTING_DEFAULTS.get(k))]
    if changed:
        raise UserError(f"{out} holds a run with different settings ({', '.join(changed)}): pass the same settings "
                        "to --resume it, or a new --out folder")


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    tensors, step, losses = read_checkpoint(path)
    saved = set(trained_tensors(tensors))
    if saved != set(params):
        raise UserError(f"checkpoint {path} holds other trained tensors than this run has (a different rank, "
                        "--vectors or --text-encoder setting?): pass the run's settings, or a new --out folder")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
            if f"exp_avg/{name}" in tensors:
                optimizer.state[p] = {"step": tensors[f"adam_step/{name}"][0].clone(),
                                      "exp_avg": tensors[f"exp_avg/{name}"].to(p.device),
                                      "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p.device)}
    return step, losses


def start_run_folder(out: Path, config: dict, resume: bool, procs: Processes) -> None:
    """Create `out` and write the run's config.json (main process, once every process has read the folder); a
    resumed run first removes the temporary files of the writes a kill cut short."""
    procs.barrier()
    if procs.main:
        if resume:
            remove_interrupted_writes(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")


def average_gradients(procs: Processes, optimizer: torch.optim.Optimizer, loss: float) -> float:
    """Average the trained tensors' gradients over the processes in place (one all-reduce, summed in float64);
    return the mean of the processes' losses."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    flat = torch.cat([g.reshape(-1).double() for g in grads] + [torch.tensor([loss], dtype=torch.float64,
                                                                             device=device)])
    procs.mean_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return float(flat[-1])


def train_steps(cfg, *, start: int, losses: list[float], optimizer: torch.optim.Optimizer,
                batch_loss: Callable[[torch.Generator], torch.Tensor], checkpoint: Callable[[int], None],
                validate: Callable[[int], None], desc: str, progress: bool,
                before_update: Callable[[], None] | None = None,
                on_step: Callable[[int, float], None] | None = None, procs: Processes = Processes(),
                after_update: Callable[[], None] | None = None, scaler=None) -> float:
    """Steps start..cfg.steps (gradient accumulation, checkpoints, validation between checkpoints); the seconds
    they took. `batch_loss(g)` draws one batch from g and returns its loss; `before_update` runs between the
    backward passes and the optimiser step (gradient clipping); `after_update` right after the optimiser step,
    before the step's checkpoint (an EMA of the weights); `on_step(steps_done, loss)` after each step, once
    its checkpoint and validation are written (progress reports: the CLI's --progress-log, the web UI).
    `scaler`: a torch.amp.GradScaler (fp16 autocast), which scales the losses' backward passes, unscales the
    gradients before `before_update` and skips an optimiser step whose gradients overflowed.

    With several processes (`procs`, learn/distributed.py) `batch_loss` returns the loss of this process's share
    of the global batch; the gradients and the loss are averaged over the processes before the optimiser step,
    and only the main process checkpoints, validates, reports and shows progress (the others go on to the next
    step's all-reduce, where they wait for it)."""
    began = time.perf_counter()
    progress = progress and procs.main
    bar = tqdm(total=cfg.steps, initial=min(start, cfg.steps), desc=desc, unit="step", disable=not progress,
               dynamic_ncols=True)
    done = saved = start  # steps finished; the last one checkpointed
    updating = False
    try:
        for step in range(start, cfg.steps):
            g = step_generator(cfg.seed, step)
            total = 0.0
            for _ in range(cfg.grad_accum):
                loss = batch_loss(g) / cfg.grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
                total += loss.item()
            if procs.several:
                total = average_gradients(procs, optimizer, total)
            if scaler is not None:
                scaler.unscale_(optimizer)  # clipping sees the true gradients
            if before_update is not None:
                before_update()
            updating = True  # an interruption from here to `done` would leave a half-updated step: no checkpoint
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if after_update is not None:
                after_update()
            losses.append(total)
            done = step + 1
            updating = False
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if not procs.main:
                continue
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                checkpoint(done)
                saved = done
            if cfg.validation_prompts and cfg.validate_every and done % cfg.validate_every == 0 and done != cfg.steps:
                validate(done)
            if on_step is not None:
                on_step(done, total)
    except BaseException:  # Ctrl-C, SIGTERM (cli.py), a failed validation or log write: keep the steps done
        if procs.main and done > saved and not updating:
            with contextlib.suppress(Exception):  # the checkpoint may fail too (disk full): report the first error
                checkpoint(done)
        bar.close()  # ends the progress bar's line, so the error message starts a line of its own
        raise
    bar.close()
    return time.perf_counter() - began
