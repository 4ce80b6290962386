"""Interruption: SIGKILL `conceptkit learn ti | lora | promptnet` at random moments, then `--resume` them.

For each trainer, on the bundled toy model with tiny settings (a few steps, a checkpoint every step or two):

1. an uninterrupted reference run (its duration and the moment its first step was logged set the kill times);
2. N trials, each in a fresh --out folder: start the CLI as a subprocess, SIGKILL it, check that every file in the
   folder is readable (safetensors open and load, JSON parses, PNG decodes), run the same command with --resume
   (every third trial: kill that one too, at a `training` or `write` moment, and resume again), and compare the
   final outputs with the reference's: every tensor of every top-level .safetensors file bitwise (torch.equal), the
   final losses, and the same set of files (validation images included, pixel for pixel).

Kill moments cycle through four kinds:
- `write`: during a checkpoint write. The child runs with its atomic writes slowed (files.atomic_path patched to
  sleep SLOW_WRITE seconds after the content is written to the temporary `.NAME.XXXX.tmp` file and before the
  rename), and the harness kills it the moment the k-th checkpoint temp file (`checkpoints/.step-*.tmp`, k random)
  appears. A kill counts as "during a checkpoint write" only when that temp file is still there after the process
  died (a kill of any kind can land in a write: all are counted the same way);
- `training`: after the k-th step is logged (--progress-log; k random), plus a random delay of up to about one
  step (steps, checkpoints, validation, the final save);
- `random`: uniformly over the first 80% of the reference's duration (imports and model loading included, so some
  kills land before the first checkpoint, or before the --out folder exists: --resume must then start cleanly from
  nothing);
- `output`: like `write`, at the k-th atomic write of any other file (config, validation images, final results).

Temporary files a killed write leaves behind (`.*.tmp` from atomic_path, `.tmpXXXXXX` from safetensors' own
writer) are hidden, never read by conceptkit, removed by the resumed run, and reported as `stale tmp` (a trial with
any left fails); every other file must be readable after every kill.

Launchers: `exec` (default) runs `python -m conceptkit.cli ...` (through this file's --child entry when writes are
slowed); `fork` forks a process that has already imported conceptkit (what the fast test uses: no 6-second import
per run). Both are real processes killed with SIGKILL.

Run: `OMP_NUM_THREADS=1 python benchmarks/reliability_kills.py --trials 10` (`--trainers ti,lora,promptnet,pretrain`,
`--seed`, `--launcher fork|exec`). Prints a table and, as its last line, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SLOW_WRITE = 0.1  # seconds a `write` trial's atomic writes wait between writing the temp file and the rename
TRAINERS = ("ti", "lora", "promptnet", "pretrain")
STEPS = 6  # every trainer's run takes this many steps
CHECKPOINT_WRITES = {"ti": 6, "lora": 3, "promptnet": 3, "pretrain": 3}  # checkpoints one run of `command` writes
DEFAULT_TRAINERS = ("ti", "lora", "promptnet")


# ----------------------------------------------------------------------------------------------- the commands

def prepare_data(root: Path) -> dict[str, Path]:
    """A tiny image folder (4 shapes-world renders) and one image of it."""
    from conceptkit.shapes.dataset import scenes, write_image_folder

    images = root / "images"
    if not images.is_dir():
        write_image_folder(images, scenes(4, seed=1, p_pair=0))
    for extra in images.glob("*.jsonl"):  # only the images: learn ti/lora read every file in the folder
        extra.unlink()
    return {"images": images, "image": min(images.glob("*.png"))}


def command(trainer: str, data: dict[str, Path], out: Path) -> list[str]:
    """The CLI arguments (after `conceptkit`) of one tiny run of `trainer` into `out`."""
    if trainer == "ti":
        return ["learn", "ti", "--images", str(data["images"]), "--token", "<kill>", "--steps", str(STEPS),
                "--batch", "2", "--checkpoint-every", "1", "--out", str(out)]
    if trainer == "lora":
        return ["learn", "lora", "--images", str(data["images"]), "--prompt", "a photo of {}", "--trigger", "zwx",
                "--rank", "2", "--steps", str(STEPS), "--batch", "2", "--checkpoint-every", "2", "--out", str(out)]
    if trainer == "promptnet":
        return ["learn", "promptnet", "--finetune", "--image", str(data["image"]), "--steps", str(STEPS),
                "--batch", "2", "--copies", "4", "--checkpoint-every", "2", "--out", str(out)]
    if trainer == "pretrain":
        return ["learn", "promptnet", "--pretrain", "--images", str(data["images"]), "--steps", str(STEPS),
                "--batch", "2", "--checkpoint-every", "2", "--validate-every", "0", "--latents", "mean",
                "--out", str(out)]
    raise ValueError(f"unknown trainer {trainer!r}: pick from {', '.join(TRAINERS)}")


# ----------------------------------------------------------------------------------------------- the child side

def slow_down_writes(seconds: float) -> None:
    """Make every atomic write wait `seconds` with its complete temp file in place, before the rename."""
    import contextlib

    from conceptkit import files

    original = files.atomic_path

    @contextlib.contextmanager
    def slow(path):
        with original(path) as tmp:
            yield tmp
            time.sleep(seconds)

    files.atomic_path = slow


def child_main(argv: list[str], slow: float) -> int:
    import torch

    torch.set_num_threads(1)
    if slow:
        slow_down_writes(slow)
    from conceptkit.cli import main

    return main(argv)


# ----------------------------------------------------------------------------------------------- launching

class Launcher:
    """Starts one CLI run as a process; `poll()` is its exit code or None; `kill()` sends SIGKILL."""

    def __init__(self, kind: str):
        if kind not in ("exec", "fork"):
            raise ValueError(f"launcher {kind!r}: exec or fork")
        self.kind = kind
        if kind == "fork":  # import everything once, in the parent, so forked children start at once
            import conceptkit.cli
            import conceptkit.learn.lora
            import conceptkit.learn.promptnet
            import conceptkit.learn.textual_inversion
            import conceptkit.models.loading
            import conceptkit.profusion.saved  # noqa: F401 - imported for the forked children

    def start(self, argv: list[str], log: Path, slow: float = 0.0) -> Run:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        if self.kind == "exec":
            if slow:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(slow), "--", *argv]
            else:
                cmd = [sys.executable, "-m", "conceptkit.cli", *argv]
            with open(log, "ab") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            return Run(proc.pid, proc)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.update(env)
                code = child_main(argv, slow)
            except BaseException:  # noqa: BLE001 - report anything, then leave without running the parent's code
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return Run(pid, None)


@dataclass
class Run:
    pid: int
    proc: subprocess.Popen | None
    code: int | None = None

    def poll(self) -> int | None:
        if self.code is not None:
            return self.code
        if self.proc is not None:
            self.code = self.proc.poll()
        else:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 600) -> int:
        end = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > end:
                os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.02)
        return self.code


def temp_files(out: Path) -> list[Path]:
    from conceptkit.files import interrupted_writes

    return interrupted_writes(out)


def run_to_end(launcher: Launcher, argv: list[str], log: Path, timeout: float = 600) -> tuple[int, float]:
    began = time.monotonic()
    code = launcher.start(argv, log).wait(timeout)
    return code, time.monotonic() - began


# ----------------------------------------------------------------------------------------------- checking files

def unreadable_files(out: Path) -> tuple[list[str], list[str]]:
    """(files that do not read back, stale temp files) under out."""
    from PIL import Image
    from safetensors import safe_open

    bad, stale = [], []
    if not out.exists():
        return bad, stale
    temporary = set(temp_files(out))
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(path.relative_to(out))
        if path in temporary:
            stale.append(rel)
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt") as f:
                    f.metadata()
                    for k in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                        f.get_tensor(k)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".jsonl":
                for line in path.read_text(encoding="utf-8").splitlines():
                    json.loads(line)
            elif path.suffix == ".png":
                with Image.open(path) as im:
                    im.load()
            elif path.suffix == ".pt":
                import torch

                torch.load(path, weights_only=True)
            else:
                path.read_bytes()
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            bad.append(f"{rel}: {type(e).__name__}: {e}")
    return bad, stale


def final_outputs(out: Path) -> dict:
    """What a finished run must reproduce: the tensors of its top-level .safetensors files (the latent cache
    aside), the final losses, the list of files (checkpoints, temp files and logs aside) and every PNG's pixels."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    tensors = {p.name: load_file(p) for p in sorted(out.glob("*.safetensors")) if p.name != "latent_cache.safetensors"}
    losses = {}
    for name, keys in (("metadata.json", ("final_loss",)), ("training.json", ("steps_done", "loss_last_100")),
                       ("promptnet.json", ("steps", "loss_last_100"))):
        if (out / name).is_file():
            data = json.loads((out / name).read_text())
            losses.update({f"{name}:{k}": data.get(k) for k in keys})
    listed = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                    and p.relative_to(out).parts[0] != "checkpoints" and not p.name.endswith(".tmp")
                    and p.suffix != ".log")
    pixels = {str(p.relative_to(out)): np.asarray(Image.open(p)) for p in sorted(out.rglob("*.png"))}
    return {"tensors": tensors, "losses": losses, "files": listed, "pixels": pixels}


def differences(ref: dict, got: dict) -> list[str]:
    import numpy as np
    import torch

    found = []
    if ref["files"] != got["files"]:
        found.append(f"files differ: missing {sorted(set(ref['files']) - set(got['files']))}, "
                     f"extra {sorted(set(got['files']) - set(ref['files']))}")
    for name, tensors in ref["tensors"].items():
        other = got["tensors"].get(name)
        if other is None:
            continue  # reported as a missing file
        if set(other) != set(tensors):
            found.append(f"{name}: other tensor names")
            continue
        for k, v in tensors.items():
            if not torch.equal(v, other[k]):
                diff = (v.double() - other[k].double()).abs().max().item() if v.shape == other[k].shape else "shape"
                found.append(f"{name}:{k} differs (max |diff| {diff})")
    if ref["losses"] != got["losses"]:
        found.append(f"losses differ: {ref['losses']} vs {got['losses']}")
    for name, px in ref["pixels"].items():
        if name in got["pixels"] and not np.array_equal(px, got["pixels"][name]):
            found.append(f"{name}: other pixels")
    return found


# ----------------------------------------------------------------------------------------------- one trial

@dataclass
class Reference:
    seconds: float
    first_step: float  # seconds from the start to the first logged step
    checkpoints: int
    outputs: dict


@dataclass
class Trial:
    trainer: str
    index: int
    mode: str
    kills: int = 0
    during_checkpoint_write: int = 0
    during_other_write: int = 0
    before_first_checkpoint: int = 0
    exited_before_kill: int = 0
    kill_times: list[float] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    stale_tmp: int = 0
    resume_codes: list[int] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def resumed_ok(self) -> bool:
        return bool(self.resume_codes) and self.resume_codes[-1] == 0 and not self.error

    @property
    def identical(self) -> bool:
        return self.resumed_ok and not self.differences

    @property
    def ok(self) -> bool:
        # the resumed run removes the temporary files of the writes the kills cut short (files.remove_interrupted_writes)
        return self.identical and not self.unreadable and self.stale_tmp == 0


def reference_run(launcher: Launcher, trainer: str, data: dict, root: Path) -> Reference:
    out = root / f"{trainer}-reference"
    shutil.rmtree(out, ignore_errors=True)
    log = root / f"{trainer}-reference.log"
    progress = root / f"{trainer}-reference.progress"
    progress.unlink(missing_ok=True)
    began = time.monotonic()
    run = launcher.start(command(trainer, data, out) + ["--progress-log", str(progress)], log)
    first = None
    while run.poll() is None:
        if first is None and progress.exists() and progress.stat().st_size:
            first = time.monotonic() - began
        time.sleep(0.005)
    seconds = time.monotonic() - began
    if run.code != 0:
        raise RuntimeError(f"the reference run of {trainer} failed (exit {run.code}); see {log}:\n"
                           + log.read_text()[-3000:])
    ckpts = len(list((out / "checkpoints").glob("step-*.safetensors"))) if (out / "checkpoints").exists() else 0
    return Reference(seconds, first if first is not None else seconds / 2, ckpts, final_outputs(out))


def kill_once(launcher: Launcher, argv: list[str], out: Path, log: Path, mode: str, ref: Reference,
              rng: random.Random, trial: Trial, checkpoint_writes: int, target: int | None = None) -> bool:
    """Start argv and SIGKILL it at a moment chosen by `mode`; True when the kill happened (False: it finished).
    `target`: for `write` and `output`, kill at this atomic write instead of a random one."""
    slow = SLOW_WRITE if mode in ("write", "output") else 0.0
    before = set(temp_files(out))
    had_checkpoint = (out / "checkpoints").exists() and any((out / "checkpoints").glob("step-*.safetensors"))
    began = time.monotonic()
    if mode == "random":  # not up to the very end: a run a little faster than the reference would finish first
        at = rng.uniform(0, 0.8 * ref.seconds)
    elif mode == "training":  # after the k-th step is logged, plus up to about one step's time
        at = None
        target = rng.randint(1, STEPS)
        delay = rng.uniform(0, max(0.05, (ref.seconds - ref.first_step) / STEPS))
    elif mode == "write":
        at = None
        target = target or rng.randint(1, checkpoint_writes)
    else:  # "output": the k-th atomic write of anything but a checkpoint (config, validation images, results)
        at = None
        target = target or rng.randint(1, max(1, len(ref.outputs["files"])))
    progress = log.with_suffix(".progress")
    progress.unlink(missing_ok=True)
    run = launcher.start(argv + ["--progress-log", str(progress)], log, slow=slow)
    seen_tmps: set[Path] = set()
    logged_at = None
    while run.poll() is None:
        now = time.monotonic() - began
        if at is not None:
            if now >= at:
                break
        elif mode == "training":
            if logged_at is None and progress.exists():
                lines = progress.read_text().splitlines()
                if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= target:
                    logged_at = now
            if logged_at is not None and now >= logged_at + delay:
                break
        else:
            tmps = [p for p in temp_files(out) if p not in before]
            wanted = [p for p in tmps if (p.parent.name == "checkpoints") == (mode == "write")]
            seen_tmps.update(wanted)
            if wanted and len(seen_tmps) >= target:
                break
            if now > 4 * ref.seconds + 60:
                break
        time.sleep(0.005)
    if run.poll() is not None:
        trial.exited_before_kill += 1
        trial.resume_codes.append(run.code)  # a run that ended by itself is a resume (or the first run) too
        return False
    run.kill()
    trial.kills += 1
    trial.kill_times.append(round(time.monotonic() - began, 3))
    left = [p for p in temp_files(out) if p not in before]
    if any(p.parent.name == "checkpoints" for p in left):
        trial.during_checkpoint_write += 1
    elif left:
        trial.during_other_write += 1
    if not had_checkpoint and not ((out / "checkpoints").exists()
                                   and any((out / "checkpoints").glob("step-*.safetensors"))):
        trial.before_first_checkpoint += 1
    bad, stale = unreadable_files(out)
    trial.unreadable += [f"after kill {trial.kills}: {b}" for b in bad]
    trial.stale_tmp = len(stale)
    return True


def run_trial(launcher: Launcher, trainer: str, index: int, mode: str, data: dict, root: Path, ref: Reference,
              rng: random.Random, kill_resume: bool, target: int | None = None) -> Trial:
    trial = Trial(trainer, index, mode)
    out = root / f"{trainer}-trial{index:02d}"
    shutil.rmtree(out, ignore_errors=True)
    log = root / f"{trainer}-trial{index:02d}.log"
    log.unlink(missing_ok=True)
    base = command(trainer, data, out)
    try:
        killed = kill_once(launcher, base, out, log, mode, ref, rng, trial, CHECKPOINT_WRITES[trainer], target)
        if killed and kill_resume:  # kill the resumed run too (another kind of moment), then resume again
            kill_once(launcher, base + ["--resume"], out, log, rng.choice(["training", "write"]), ref, rng, trial,
                      CHECKPOINT_WRITES[trainer])
        if not trial.resume_codes or trial.resume_codes[-1] != 0 or killed:
            code, _ = run_to_end(launcher, base + ["--resume"], log)
            trial.resume_codes.append(code)
        if trial.resume_codes[-1] != 0:
            trial.error = f"--resume exited {trial.resume_codes[-1]}: " + log.read_text()[-1500:]
            return trial
        bad, stale = unreadable_files(out)
        trial.unreadable += [f"at the end: {b}" for b in bad]
        trial.stale_tmp = len(stale)
        trial.differences = differences(ref.outputs, final_outputs(out))
    except Exception as e:  # noqa: BLE001 - a crash of the harness on one trial is reported, not fatal
        import traceback

        trial.error = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
    return trial


MODES = ("write", "training", "random", "output")


def run_trainer(launcher: Launcher, trainer: str, trials: int, data: dict, root: Path, rng: random.Random,
                verbose: bool = True) -> tuple[Reference, list[Trial]]:
    ref = reference_run(launcher, trainer, data, root)
    if verbose:
        print(f"[{trainer}] reference: {ref.seconds:.1f} s, first step at {ref.first_step:.1f} s, "
              f"{ref.checkpoints} checkpoint(s) kept", flush=True)
    results = []
    for i in range(trials):
        mode = MODES[i % len(MODES)]
        t = run_trial(launcher, trainer, i, mode, data, root, ref, rng, kill_resume=(i % 3 == 2))
        results.append(t)
        if verbose:
            status = "ok" if t.ok else "FAIL"
            print(f"[{trainer}] trial {i} ({mode}): {status}; kills {t.kills} at {t.kill_times} s, "
                  f"during checkpoint write {t.during_checkpoint_write}, other write {t.during_other_write}, "
                  f"before first checkpoint {t.before_first_checkpoint}, finished before the kill "
                  f"{t.exited_before_kill}, resume exits {t.resume_codes}, stale tmp {t.stale_tmp}"
                  + (f"\n    unreadable: {t.unreadable}" if t.unreadable else "")
                  + (f"\n    differences: {t.differences}" if t.differences else "")
                  + (f"\n    error: {t.error}" if t.error else ""), flush=True)
    return ref, results


def table(results: dict[str, list[Trial]]) -> str:
    head = ("| trainer | trials | kills | during a checkpoint write | during another write | before the first "
            "checkpoint | resumed OK | identical to reference | unreadable files | stale tmp files left |")
    rows = [head, "|" + "---|" * 10]
    for trainer, ts in results.items():
        rows.append(f"| {trainer} | {len(ts)} | {sum(t.kills for t in ts)} | "
                    f"{sum(t.during_checkpoint_write for t in ts)} | {sum(t.during_other_write for t in ts)} | "
                    f"{sum(t.before_first_checkpoint for t in ts)} | {sum(t.resumed_ok for t in ts)} | "
                    f"{sum(t.identical for t in ts)} | {sum(len(t.unreadable) for t in ts)} | "
                    f"{sum(t.stale_tmp for t in ts)} |")
    return "\n".join(rows)


def summary(results: dict[str, list[Trial]]) -> dict:
    ts = [t for group in results.values() for t in group]
    return {"row": "kills survived", "handled": sum(t.ok for t in ts), "tried": len(ts),
            "kills": sum(t.kills for t in ts), "during_checkpoint_write": sum(t.during_checkpoint_write for t in ts)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # the child entry of an `exec` run with slowed writes
        slow, rest = float(argv[1]), argv[argv.index("--") + 1:]
        return child_main(rest, slow)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=10, help="trials per trainer")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    p.add_argument("--trainers", default=",".join(DEFAULT_TRAINERS), help=f"from {','.join(TRAINERS)}")
    p.add_argument("--launcher", choices=["exec", "fork"], default="exec")
    p.add_argument("--work", help="keep the run folders here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    for t in trainers:
        command(t, {"images": Path(), "image": Path()}, Path())  # unknown names fail here
    rng = random.Random(args.seed)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="conceptkit-kills-") as tmp:
        root = Path(args.work) if args.work else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = prepare_data(root)
        launcher = Launcher(args.launcher)
        results = {}
        for trainer in trainers:
            _, results[trainer] = run_trainer(launcher, trainer, args.trials, data, root, rng)
    print(f"\n{args.trials} trials per trainer, launcher {args.launcher}, seed {args.seed}, "
          f"{time.monotonic() - began:.0f} s in all\n")
    print(table(results))
    print(json.dumps(summary(results)))
    return 0 if all(t.ok for ts in results.values() for t in ts) else 1


if __name__ == "__main__":
    sys.exit(main())
