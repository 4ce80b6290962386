"""Run by tests/test_distributed.py (and benchmarks/reliability_processes.py) under
`accelerate launch --multi_gpu --num_processes 2 tests/distributed_worker.py OUT IMAGES` (gloo on CPU): Textual
Inversion (2 steps, then --resume to 4), LoRA (4 steps), generate and compose, each split over the processes, on
the bundled model. The same settings with one process and batch x 2 are the reference (the test runs them itself).

Not a test module (no test_ prefix): pytest does not collect it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from conceptkit.learn.lora_config import LoRAConfig
from conceptkit.learn.ti_config import TIConfig

GENERATE = dict(prompts=["a red circle", "a blue striped star on a gray background"], seed=3, num_images=3, steps=5)
COMPOSE = dict(template="a {star} and a {moon}", methods=["clora", "merge"], seeds=[0, 1, 2])


def compose_inputs():
    """The bundled star and moon LoRAs, and a 5-step CLoRA config."""
    from conceptkit.compose.config import CLoRAConfig
    from conceptkit.compose.run import LoraSpec
    from conceptkit.evaluate.clora import bundled_loras_path

    folder = bundled_loras_path()
    loras = [LoraSpec.parse(f"star={folder / 'red-striped-star.safetensors'}"),
             LoraSpec.parse(f"moon={folder / 'cyan-dotted-moon.safetensors'}")]
    return loras, CLoRAConfig(steps=5)


def ti_config(batch: int, steps: int = 4) -> TIConfig:
    return TIConfig(token="<t>", steps=steps, batch=batch, lr=5e-3, checkpoint_every=2, validation_prompts=())


def lora_config(batch: int) -> LoRAConfig:
    return LoRAConfig(trigger="zwx", prompt="a photo of zwx star", steps=4, batch=batch, rank=4, lr=1e-3,
                      checkpoint_every=2, validation_prompts=())


def main(out: Path, images: str) -> None:
    from conceptkit.compose.run import compose
    from conceptkit.generate.images import generate
    from conceptkit.learn.distributed import process_device, processes
    from conceptkit.learn.lora import learn_lora
    from conceptkit.learn.textual_inversion import learn_textual_inversion
    from conceptkit.models.loading import load_pipeline

    torch.set_num_threads(1)
    procs = processes()
    assert procs.count == 2, procs
    per = 2  # per process: global batch 4
    device = process_device("auto")
    pipe = load_pipeline("toy", device=device)
    learn_textual_inversion(pipe, images, out / "ti", ti_config(per, steps=2), progress=False)
    learn_textual_inversion(load_pipeline("toy", device=device), images, out / "ti", ti_config(per), resume=True,
                            progress=False)
    learn_lora(load_pipeline("toy", device=device), images, out / "lora", lora_config(per), progress=False)
    generate(load_pipeline("toy", device=device), **GENERATE, progress=False, out_dir=out / "generate", procs=procs)
    loras, cfg = compose_inputs()
    compose(load_pipeline("toy", device=device), concepts=loras, cfg=cfg, **COMPOSE, out_dir=out / "compose",
            procs=procs)
    if procs.main:
        (out / "done").write_text(str(procs.count))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
