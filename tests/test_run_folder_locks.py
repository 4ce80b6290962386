"""One writer per run folder: a second process refuses in one line naming the folder and the owner; a lock left by
a SIGKILLed process is taken over (locks.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from option_sweep import run_argv

from conceptkit import locks

CONCEPT = Path(__file__).parents[1] / "src/conceptkit/bundled/concepts/red-striped-star"
HOLD = "import sys, time; from conceptkit import locks; locks.acquire(sys.argv[1]); print('held', flush=True); " \
       "time.sleep(600)"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def learn_ti(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "conceptkit", "learn", "ti", "--images", str(CONCEPT), "--token", "<s>",
            "--batch", "1", "--no-validation", "--out", str(out), *extra]


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


# every command that writes a folder, with the least arguments it needs; the folder is the last argument's value
WRITERS = {
    "generate": ["generate", "--prompt", "x", "--out"],
    "compose": ["compose", "--prompt", "a {a}", "--out"],
    "learn ti": ["learn", "ti", "--images", str(CONCEPT), "--token", "<s>", "--out"],
    "learn lora": ["learn", "lora", "--images", str(CONCEPT), "--out"],
    "learn promptnet": ["learn", "promptnet", "--finetune", "--image", str(CONCEPT / "0.png"), "--out"],
    "evaluate base": ["evaluate", "base", "--images"],
    "evaluate ti": ["evaluate", "ti", "--out"],
    "evaluate clora": ["evaluate", "clora", "--images"],
    "evaluate profusion": ["evaluate", "profusion", "--out"],
    "evaluate dreambench": ["evaluate", "dreambench", "--data", "d", "--out"],
    "demo": ["demo", "--out"],
    "report": ["report", "r.json", "--out"],
    "shapes sample": ["shapes", "sample", "--out"],
    "shapes train-base": ["shapes", "train-base", "--run"],
    "ui": ["ui", "--work"],
    "convert promptnet": ["convert", "promptnet", "--from-official", "x", "--out"],
}


@pytest.fixture(scope="module")
def held_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("held") / "run"
    proc = hold_lock(folder)
    yield folder, proc.pid
    stop(proc)


@pytest.mark.parametrize("name", WRITERS)
def test_a_second_writer_is_refused_naming_the_folder_and_owner(name, held_folder, tmp_path):
    folder, owner = held_folder
    before = sorted(folder.iterdir())
    outcome = run_argv([*WRITERS[name], str(folder)], tmp_path)
    assert outcome.code == 2 and not outcome.crash
    assert outcome.stderr.startswith(f"error: {folder} is being written by conceptkit process {owner} on ")
    assert outcome.stderr.count("\n") == 1
    assert sorted(folder.iterdir()) == before and outcome.written == []


def test_two_learn_ti_processes_racing_on_one_out_leave_one_consistent_run(tmp_path):
    """The issue's case: same --out, seeds 0 and 5, started together. Before: both succeeded and the folder mixed
    one run's config.json with the other's metadata.json."""
    out = tmp_path / "run"
    procs = [subprocess.Popen(learn_ti(out, "--steps", "40", "--seed", str(seed)), env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in (0, 5)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = [err for code, err in results if code == 2][0]
    errors = [line for line in refusal.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0] and "Traceback" not in refusal
    winner_seed = (0, 5)[[code for code, _ in results].index(0)]
    config = json.loads((out / "config.json").read_text())
    metadata = json.loads((out / "metadata.json").read_text())
    assert config["seed"] == metadata["seed"] == winner_seed
    assert not (out / locks.LOCK_NAME).exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    proc = hold_lock(folder)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = json.loads((folder / locks.LOCK_NAME).read_text())
    assert left["pid"] == proc.pid  # the record stays behind; the kernel dropped the flock itself
    lock = locks.acquire(folder)
    try:
        assert lock.took_over["pid"] == proc.pid
        assert json.loads((folder / locks.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        locks.release(lock)
    assert not (folder / locks.LOCK_NAME).exists()


def test_learn_ti_killed_with_sigkill_then_resumed_takes_over_its_lock(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(learn_ti(out, "--steps", "2000", "--checkpoint-every", "2"), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step-*.safetensors")):
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert json.loads((out / locks.LOCK_NAME).read_text())["pid"] == first.pid
    resumed = subprocess.run(learn_ti(out, "--steps", "40", "--checkpoint-every", "2", "--resume"), env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-500:]
    assert (out / "learned_embeds.safetensors").is_file() and not (out / locks.LOCK_NAME).exists()


def test_a_second_ui_job_queue_on_one_workspace_is_refused(held_folder):
    from conceptkit.errors import UserError
    from conceptkit.ui.jobs import JobQueue

    folder, owner = held_folder
    with pytest.raises(UserError, match=f"being written by conceptkit process {owner} "):
        JobQueue(folder)


def test_a_refused_run_leaves_no_folder_it_created(tmp_path):
    """A run that fails before writing anything removes the --out the lock created (as before locks existed)."""
    outcome = run_argv(["report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "new")], tmp_path)
    assert outcome.code == 2 and not (tmp_path / "new").exists()
