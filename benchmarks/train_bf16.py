"""Training steps on a CPU with native bf16 (issue 21): `learn ti` and `learn lora` with `--mixed-precision no`
(the default) vs `bf16` (the frozen models under bf16 autocast; the trained tensors stay float32), on the bundled
model, the first bundled concept set, batch 4, no validation. Both variants run in one process, interleaved round by
round; per variant the median process CPU time (time.process_time) and wall time per step, and the largest
difference of the loss trajectories from the float32 run's.

    python benchmarks/train_bf16.py --threads 1 --steps 20 --rounds 3

Wall times on a shared machine are contended (the load average is printed); CPU times are the steadier figure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from conceptkit.learn.lora import LoRAConfig, learn_lora
    from conceptkit.learn.textual_inversion import TIConfig, learn_textual_inversion
    from conceptkit.models.loading import load_pipeline
    from conceptkit.shapes.concepts import CONCEPTS, concept_folder

    images = concept_folder(CONCEPTS[0])
    pipe = load_pipeline("toy", device="cpu")

    runs = iter(range(10**6))

    def ti(precision):  # a new token each run: a finished run adds its token to the pipeline
        cfg = TIConfig(token=f"<bench-{next(runs)}>", steps=args.steps, checkpoint_every=10**9, validation_prompts=(),
                       mixed_precision=precision)
        with tempfile.TemporaryDirectory() as out:
            return learn_textual_inversion(pipe, images, out, cfg, progress=False).losses

    def lora(precision):
        cfg = LoRAConfig(steps=args.steps, batch=4, checkpoint_every=10**9, validation_prompts=(),
                         mixed_precision=precision, prompt="a photo of {}")
        with tempfile.TemporaryDirectory() as out:
            return learn_lora(pipe, images, out, cfg, progress=False).losses

    variants = {(m, p): (fn, p) for m, fn in (("learn ti", ti), ("learn lora", lora)) for p in ("no", "bf16")}
    times = {k: [] for k in variants}
    losses = {}
    for _ in range(args.rounds):
        for key, (fn, precision) in variants.items():
            c, w = time.process_time(), time.perf_counter()
            losses[key] = fn(precision)
            times[key].append(((time.process_time() - c) / args.steps, (time.perf_counter() - w) / args.steps))
    print(f"bundled model, batch 4, {args.steps} steps (set-up included), {args.threads} thread(s), {args.rounds} "
          "interleaved rounds (medians)\n")
    print("| command | --mixed-precision | CPU s/step | wall s/step (min-max) | speed-up (CPU) | max loss diff vs no |")
    print("|---|---|---|---|---|---|")
    for (method, precision), runs in times.items():
        cpu = statistics.median(c for c, _ in runs)
        base = statistics.median(c for c, _ in times[(method, "no")])
        walls = [w for _, w in runs]
        gap = max(abs(a - b) for a, b in zip(losses[(method, precision)], losses[(method, "no")]))
        print(f"| {method} | {precision} | {cpu:.3f} | {statistics.median(walls):.3f} ({min(walls):.3f}-"
              f"{max(walls):.3f}) | {base / cpu:.2f}x | {gap:.1e} |")
    print(f"\nload average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
