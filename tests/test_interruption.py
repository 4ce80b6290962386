"""Interruption: `learn ti`, `learn lora` and `learn promptnet --finetune`, SIGKILLed during a checkpoint write and
during training (then again while resuming), finish with --resume with every file readable after every kill and
results bitwise equal to an uninterrupted run. The fast version of benchmarks/reliability_kills.py (its functions,
its tiny runs on the bundled toy model; forked processes, so no run pays the imports again)."""
import importlib.util
import random
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "reliability_kills.py"


def _harness():
    spec = importlib.util.spec_from_file_location("reliability_kills", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


rk = _harness()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("kills")
    return rk.Launcher("fork"), rk.prepare_data(root), root


@pytest.mark.parametrize("trainer", ["ti", "lora", "promptnet"])
def test_killed_runs_resume_to_the_uninterrupted_result(setup, trainer):
    """Trial 0: killed while a checkpoint is written, its --resume killed again (after a logged step, or in another
    checkpoint write), resumed to the end. Trial 1: killed while the third non-checkpoint file is written (ti, lora:
    the second validation image, so the validation folder is there but incomplete; promptnet: training.json)."""
    launcher, data, root = setup
    ref = rk.reference_run(launcher, trainer, data, root)
    rng = random.Random(0)
    twice = rk.run_trial(launcher, trainer, 0, "write", data, root, ref, rng, kill_resume=True)
    output = rk.run_trial(launcher, trainer, 1, "output", data, root, ref, rng, kill_resume=False, target=3)
    for t in (twice, output):
        assert not t.error, t.error
        assert t.unreadable == [], t.unreadable
        assert t.resumed_ok, t.resume_codes
        assert t.differences == [], t.differences
        assert t.stale_tmp == 0  # the resume cleaned up after the killed writes
        assert t.ok
    assert twice.kills >= 1 and twice.during_checkpoint_write >= 1
    assert output.kills == 1 and output.during_other_write == 1
    summary = rk.summary({trainer: [twice, output]})
    assert summary["handled"] == summary["tried"] == 2


def test_resume_cleanup_removes_only_the_temporary_files_of_killed_writes(tmp_path):
    from conceptkit.files import remove_interrupted_writes

    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".config.json.k2j4.tmp", tmp_path / "checkpoints" / ".step-000002.safetensors.a1b2.tmp",
             tmp_path / ".tmp6x3kuY"]  # the last: safetensors' own writer, killed inside save_file
    kept = [tmp_path / "config.json", tmp_path / "tmp.png", tmp_path / ".keep",
            tmp_path / "checkpoints" / "step-000002.safetensors"]
    for p in stale + kept:
        p.write_text("x")
    assert remove_interrupted_writes(tmp_path) == 3
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
