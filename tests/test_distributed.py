"""Several processes (learn/distributed.py): Textual Inversion, LoRA, generate and compose launched as 2 CPU processes (gloo)
with `accelerate launch` match one process with the same global batch.

One launch of tests/distributed_worker.py does all three (TI is run as 2 steps, then --resume to 4, so a resumed
multi-process run is checked too); the single-process reference runs here. Training is on the bundled model: the
random-weight test fixture is so badly conditioned that float32 gradients of the same batch, summed in another order,
differ by 0.3% (the bundled model: 5e-7).

Tolerances (measured values in brackets; README "Several processes / GPUs"):
- the losses of every step: within LOSS_TOLERANCE relative [TI 1e-7, LoRA 1e-7];
- Adam's moments (running means of the averaged gradients and of their squares): within MOMENT_TOLERANCE of each
  tensor's largest value [TI 3e-6, LoRA 4e-5];
- the trained tensors: within STEP_TOLERANCE x lr x steps, i.e. a small fraction of the most Adam can move an element
  [TI 3e-6, LoRA 1e-3]. Adam divides each element's step by that element's own gradient size, so an element whose
  gradient is near zero (LoRA's cross-attention keys) turns a float-rounding difference into a visible one; relative
  to each tensor's largest value the LoRA tensors differ by up to 1e-3, TI's vector by 3e-7;
- generated PNGs: byte-identical.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptkit.compose.run import compose
from conceptkit.generate.images import generate
from conceptkit.learn.lora import learn_lora
from conceptkit.learn.textual_inversion import learn_textual_inversion
from conceptkit.models.loading import load_pipeline
from conceptkit.shapes.concepts import CONCEPTS, concept_folder

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

LOSS_TOLERANCE = 1e-5
MOMENT_TOLERANCE = 1e-3
STEP_TOLERANCE = 1e-2
WORKER = Path(__file__).parent / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, images: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N` (torch.distributed.run underneath; with CUDA hidden,
    conceptkit sets up gloo on CPU)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CONCEPTKIT_TOY_MODEL", None)
    return subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes),
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), str(WORKER), str(out), str(images)],
                          env=env, capture_output=True, text=True, timeout=600)


def relative_differences(single: dict[str, torch.Tensor], several: dict[str, torch.Tensor]) -> dict[str, float]:
    assert set(single) == set(several)
    return {k: float((single[k] - several[k]).abs().max() / single[k].abs().max().clamp_min(1e-12)) for k in single}


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    last = sorted((folder / "checkpoints").glob("step-*.safetensors"))[-1]
    return {k: v for k, v in load_file(last).items() if not k.startswith("adam_step/")}


def compare(single: Path, several: Path, lr: float, steps: int) -> dict[str, float]:
    """The largest differences between two runs' last checkpoints: params in units of lr x steps, Adam's moments
    and the losses relative."""
    one, two = checkpoint_tensors(single), checkpoint_tensors(several)
    assert set(one) == set(two)
    params = max(float((one[k] - two[k]).abs().max()) for k in one if k.startswith("param/")) / (lr * steps)
    params_rel = max(v for k, v in relative_differences(one, two).items() if k.startswith("param/"))
    moments = max(v for k, v in relative_differences(one, two).items() if not k.startswith("param/"))
    losses = [json.loads((run / "metadata.json").read_text()) for run in (single, several)]
    from conceptkit.learn.loop import read_checkpoint

    curves = [read_checkpoint(sorted((run / "checkpoints").glob("step-*.safetensors"))[-1])[2]
              for run in (single, several)]
    assert len(curves[0]) == len(curves[1]) == steps
    loss = max(abs(a - b) / abs(a) for a, b in zip(*curves))
    assert losses[0]["processes"] == 1 and losses[1]["processes"] == 2 and losses[1]["batch"] * 2 == losses[0]["batch"]
    return {"params_per_lr_step": params, "params_relative": params_rel, "moments_relative": moments, "loss": loss}


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    monkeypatch.delenv("CONCEPTKIT_TOY_MODEL", raising=False)
    images = concept_folder(CONCEPTS[0])
    several = tmp_path / "several"
    run = launch(several, images)
    assert run.returncode == 0 and (several / "done").is_file(), run.stdout[-3000:] + run.stderr[-3000:]

    single = tmp_path / "single"
    learn_textual_inversion(load_pipeline("toy"), images, single / "ti", worker.ti_config(4), progress=False)
    learn_lora(load_pipeline("toy"), images, single / "lora", worker.lora_config(4), progress=False)
    generate(load_pipeline("toy"), **worker.GENERATE, progress=False, out_dir=single / "generate")
    loras, cfg = worker.compose_inputs()
    compose(load_pipeline("toy"), concepts=loras, cfg=cfg, **worker.COMPOSE, out_dir=single / "compose")

    report = {}
    for method, cfg in (("ti", worker.ti_config(4)), ("lora", worker.lora_config(4))):
        report[method] = d = compare(single / method, several / method, cfg.lr, cfg.steps)
        print(f"{method}, 2 processes vs 1: {d}")
        assert d["loss"] <= LOSS_TOLERANCE and d["moments_relative"] <= MOMENT_TOLERANCE, d
        assert d["params_per_lr_step"] <= STEP_TOLERANCE, d
    single_ti = load_file(single / "ti" / "learned_embeds.safetensors")["<t>"]
    several_ti = load_file(several / "ti" / "learned_embeds.safetensors")["<t>"]
    assert float((single_ti - several_ti).abs().max()) <= STEP_TOLERANCE * 5e-3 * 4

    for command, count in (("generate", 7), ("compose", 7)):  # 6 images + grid.png; 2 methods x 3 seeds + grid
        names = sorted(str(p.relative_to(single / command)) for p in (single / command).rglob("*.png"))
        assert names == sorted(str(p.relative_to(several / command)) for p in (several / command).rglob("*.png"))
        assert len(names) == count, names
        for name in names:
            assert (single / command / name).read_bytes() == (several / command / name).read_bytes(), name


def test_commands_that_do_not_split_their_work_refuse_several_processes(tmp_path, monkeypatch, capsys):
    from conceptkit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under `accelerate launch --num_processes 2`; no process group needed
    assert main(["shapes", "sample", "--n", "1", "--out", str(tmp_path / "s")]) == 2
    assert "runs in one process" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    from conceptkit.errors import UserError
    from conceptkit.learn.loop import check_same_settings

    check_same_settings(tmp_path, {"batch": 2, "processes": 1}, {"batch": 2})  # a run from before the field
    with pytest.raises(UserError, match="processes"):
        check_same_settings(tmp_path, {"batch": 2, "processes": 2}, {"batch": 2, "processes": 1})
