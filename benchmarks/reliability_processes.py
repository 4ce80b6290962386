"""Several processes: the user-facing commands under `accelerate launch --num_processes 2` against one process.

For each command, on the bundled toy model, on CPU (CUDA hidden; conceptkit sets up gloo):

- `learn ti` and `learn lora`: one process with --batch 4 versus 2 processes with --batch 2 (the same global
  batch, so the same samples); compared: the trained tensors (max abs difference, also in units of lr x steps, the
  most Adam can move an element), Adam's moments and the loss of every step (relative);
- `generate`: 2 prompts x 3 seeds, one process versus 2 (each makes 3 images); `compose`: the bundled star and
  moon LoRAs, clora and merge at 3 seeds; `evaluate base`: 96 held-out prompts at 1 seed, 3 steps; compared: every
  PNG (and grid.png) byte for byte, and evaluate's scores.

Tolerances are those of tests/test_distributed.py (the README explains them). The command run is printed per row.

    OMP_NUM_THREADS=1 python benchmarks/reliability_processes.py [--steps 4] [--keep DIR]

The last line is one JSON object: {"row": "processes tested", "handled": passing, "tried": configs, "processes": 2}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOSS_TOLERANCE, MOMENT_TOLERANCE, STEP_TOLERANCE = 1e-5, 1e-3, 1e-2
PROCESSES = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args: list[str], processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "conceptkit.cli", *args]
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "conceptkit.cli", *args]


def run(args: list[str], processes: int) -> tuple[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CONCEPTKIT_TOY_MODEL", None)
    cmd = command(args, processes)
    began = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    shown = ["python" if processes == 1 else "accelerate"] + cmd[1:]
    return shlex.join(shown), time.perf_counter() - began


def compare_training(one: Path, two: Path, lr: float, steps: int) -> dict:
    from safetensors.torch import load_file

    from conceptkit.learn.loop import read_checkpoint

    last = [sorted((run / "checkpoints").glob("step-*.safetensors"))[-1] for run in (one, two)]
    a, b = (load_file(p) for p in last)
    params = [k for k in a if k.startswith("param/")]
    moments = [k for k in a if k.startswith("exp_avg")]
    abs_diff = max(float((a[k] - b[k]).abs().max()) for k in params)
    rel = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in moments)
    curves = [read_checkpoint(p)[2] for p in last]
    loss = max(abs(x - y) / abs(x) for x, y in zip(*curves))
    ok = (len(curves[0]) == len(curves[1]) == steps and abs_diff / (lr * steps) <= STEP_TOLERANCE
          and rel <= MOMENT_TOLERANCE and loss <= LOSS_TOLERANCE and set(a) == set(b))
    return {"max_abs_diff": abs_diff, "per_lr_step": abs_diff / (lr * steps), "moments_rel": rel, "loss_rel": loss,
            "ok": ok}


def compare_images(one: Path, two: Path) -> dict:
    names = sorted(str(p.relative_to(one)) for p in one.rglob("*.png"))
    same = names == sorted(str(p.relative_to(two)) for p in two.rglob("*.png")) and all(
        (one / n).read_bytes() == (two / n).read_bytes() for n in names)
    if (one / "scores.json").exists():
        scores = [{k: v for k, v in json.loads((run / "scores.json").read_text()).items() if k != "seconds"}
                  for run in (one, two)]
        same = same and scores[0] == scores[1]
    return {"max_abs_diff": 0.0 if same else float("nan"), "files": len(names), "ok": same and len(names) > 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()
    from conceptkit.evaluate.clora import bundled_loras_path
    from conceptkit.shapes.concepts import CONCEPTS, concept_folder

    images = str(concept_folder(CONCEPTS[0]))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="conceptkit-processes-"))
    s = str(args.steps)
    loras = bundled_loras_path()
    configs = {
        "learn ti": (["learn", "ti", "--images", images, "--token", "<t>", "--steps", s, "--lr", "5e-3",
                      "--checkpoint-every", "2"], "--batch", 5e-3),
        "learn lora": (["learn", "lora", "--images", images, "--prompt", "a photo of zwx star", "--trigger", "zwx",
                        "--steps", s, "--lr", "1e-3", "--checkpoint-every", "2", "--validation-prompt",
                        "a photo of {}"], "--batch", 1e-3),
        "generate": (["generate", "--prompt", "a red circle", "--prompt", "a blue striped star on a gray background",
                      "--num-images", "3", "--seed", "3", "--steps", "10"], None, None),
        "compose": (["compose", "--prompt", "a {star} and a {moon}", "--lora",
                     f"star={loras / 'red-striped-star.safetensors'}", "--lora",
                     f"moon={loras / 'cyan-dotted-moon.safetensors'}", "--method", "clora,merge", "--num-images", "3",
                     "--steps", "5"], None, None),
        "evaluate base": (["evaluate", "base", "--seeds", "1", "--steps", "3"], None, None),
    }
    rows = []
    for name, (base, batch_flag, lr) in configs.items():
        outs, cmds, secs = {}, {}, {}
        try:
            for n in (1, PROCESSES):
                out = root / name.replace(" ", "-") / f"p{n}"
                extra = [batch_flag, str(4 // n)] if batch_flag else []
                where = (["--images", str(out), "--json", str(out / "scores.json")] if name == "evaluate base"
                         else ["--out", str(out)])
                cmds[n], secs[n] = run(base + extra + where, n)
                outs[n] = out
            result = (compare_training(outs[1], outs[PROCESSES], lr, args.steps) if batch_flag
                      else compare_images(outs[1], outs[PROCESSES]))
        except Exception as e:  # noqa: BLE001 - a failing config is a row, not a crash
            result = {"max_abs_diff": float("nan"), "ok": False, "error": str(e)[-500:]}
        rows.append({"config": name, "processes": PROCESSES, **result, "seconds_1": round(secs.get(1, 0), 1),
                     f"seconds_{PROCESSES}": round(secs.get(PROCESSES, 0), 1), "command": cmds.get(PROCESSES, "")})

    print(f"| what | processes | max abs diff vs 1 process | in lr x steps | moments (rel) | losses (rel) | "
          f"s (1 proc) | s ({PROCESSES} procs) | pass |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def fmt(key):
            return f"{r[key]:.1e}" if key in r else "-"
        what = r["config"] + (" (global batch 4)" if r["config"].startswith("learn") else " (PNG bytes)")
        print(f"| {what} | {r['processes']} | {fmt('max_abs_diff')} | {fmt('per_lr_step')} | {fmt('moments_rel')} | "
              f"{fmt('loss_rel')} | {r['seconds_1']} | {r[f'seconds_{PROCESSES}']} | {'yes' if r['ok'] else 'NO'} |")
    for r in rows:
        print(f"{r['config']}: {r['command']}" + (f"\n  error: {r['error']}" if "error" in r else ""))
    print(json.dumps({"row": "processes tested", "handled": sum(r["ok"] for r in rows), "tried": len(rows),
                      "processes": PROCESSES}))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
