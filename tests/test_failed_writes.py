"""A write the disk refuses half-way (a file-size limit standing in for a full disk; a read-only folder) leaves the
earlier state intact and ends in one line; a trainer stopped between checkpoints first checkpoints its last step."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptkit.cli import main
from conceptkit.files import interrupted_writes

CONCEPT = Path(__file__).parents[1] / "src/conceptkit/bundled/concepts/red-striped-star"
SRC = Path(__file__).parents[1] / "src"
# a full disk, for one process: writes past 1000 bytes fail with EFBIG (SIGXFSZ ignored so it is an error, not a
# kill). 1000 bytes fit the lock record and config.json, not a TI checkpoint (about 1.8 kB).
LIMITED = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); from conceptkit.cli import main; "
           "sys.exit(main(sys.argv[1:]))")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}


def learn_ti(out: Path, *extra: str) -> list[str]:
    return ["learn", "ti", "--images", str(CONCEPT), "--token", "<s>", "--batch", "1", "--no-validation",
            "--checkpoint-every", "2", "--out", str(out), *extra]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


def test_disk_full_during_a_checkpoint_keeps_the_earlier_run(tmp_path):
    out = tmp_path / "run"
    assert main(learn_ti(out, "--steps", "4")) == 0
    before = snapshot(out)
    proc = subprocess.run([sys.executable, "-c", LIMITED, *learn_ti(out, "--steps", "8", "--resume")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "could not write" in line and "step-000006.safetensors" in line and "File too large" in line
    after = snapshot(out)
    # config.json records the resumed run's --steps (written, atomically, before the failure); nothing else changed
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items()
                                                                      if k != "config.json"}
    assert json.loads((out / "config.json").read_text())["steps"] == 8
    assert interrupted_writes(out) == []
    load_file(out / "checkpoints/step-000004.safetensors")  # still readable
    assert main(learn_ti(out, "--steps", "8", "--resume")) == 0  # with room again, the run goes on


def run_read_only_aware(args: list[str]) -> subprocess.CompletedProcess:
    """Run conceptkit where a 0555 folder is read-only: root ignores file modes (CAP_DAC_OVERRIDE), so as root the
    command runs with that capability dropped (setpriv), as an ordinary user would."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a read-only folder cannot be simulated")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                  "--inh-caps=-dac_override,-dac_read_search", "--"]
    return subprocess.run([*prefix, sys.executable, "-m", "conceptkit", *args], env=ENV, capture_output=True,
                          text=True, timeout=300)


def make_read_only(*paths: Path) -> None:
    for path in paths:
        path.chmod(0o555)


def test_a_read_only_run_folder_is_refused_in_one_line_and_kept(tmp_path):
    out = tmp_path / "run"
    assert main(learn_ti(out, "--steps", "2")) == 0
    before = snapshot(out)
    make_read_only(out, out / "checkpoints")
    proc = run_read_only_aware(learn_ti(out, "--steps", "4", "--resume"))
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: cannot write in {out}: Permission denied")
    assert snapshot(out) == before


def test_a_read_only_checkpoint_folder_fails_half_way_and_keeps_the_earlier_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert main(learn_ti(out, "--steps", "2")) == 0
    make_read_only(out / "checkpoints")
    before = snapshot(out / "checkpoints")
    proc = run_read_only_aware(learn_ti(out, "--steps", "4", "--resume"))
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "could not write" in line and "checkpoints" in line and "Permission denied" in line
    assert snapshot(out / "checkpoints") == before and interrupted_writes(out) == []


def test_a_trainer_stopped_between_checkpoints_checkpoints_its_last_step(tmp_path):
    """Ctrl-C, SIGTERM (cli.py turns it into KeyboardInterrupt) or a failed write after step 3 of a run that
    checkpoints every 100: step 3 is saved, and resuming from it gives the uninterrupted run's vectors exactly."""
    from conceptkit.learn.textual_inversion import learn_textual_inversion
    from conceptkit.learn.ti_config import TIConfig
    from conceptkit.models.loading import load_pipeline

    cfg = TIConfig(token="<s>", steps=6, batch=1, checkpoint_every=100, validation_prompts=())

    def stop_after_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learn_textual_inversion(load_pipeline("toy", device="cpu"), CONCEPT, tmp_path / "a", cfg, progress=False,
                                on_step=stop_after_3)
    assert [p.name for p in (tmp_path / "a/checkpoints").iterdir()] == ["step-000003.safetensors"]
    learn_textual_inversion(load_pipeline("toy", device="cpu"), CONCEPT, tmp_path / "a", cfg, resume=True,
                            progress=False)
    learn_textual_inversion(load_pipeline("toy", device="cpu"), CONCEPT, tmp_path / "b", cfg, progress=False)
    a, b = (load_file(tmp_path / x / "learned_embeds.safetensors") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
