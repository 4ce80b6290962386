"""Training speed against diffusers' own example scripts (issue 21): seconds per step of
`examples/textual_inversion/textual_inversion.py` vs `conceptkit learn ti`, and of
`examples/dreambooth/train_dreambooth_lora.py` vs `conceptkit learn lora`; target conceptkit / diffusers <= 0.5.

    python benchmarks/train_speed_vs_diffusers.py --scripts DIR --threads 1 --steps-short 10 --steps-long 60 --rounds 3

DIR holds the two scripts, unmodified, as diffusers ships them (`textual_inversion.py`, `train_dreambooth_lora.py`;
e.g. `git show <ref>:examples/textual_inversion/textual_inversion.py`). They are not part of this repository: the
benchmark copies them to a temporary folder, applies the patches below (each a string replacement that fails loudly
when the text it replaces is missing, so a changed script is never patched silently) and runs them there.

Patches, only what a CPU-only, offline run in this environment needs:

- `min_version`: the script's `check_min_version("X")` line is commented out, and only when X is newer than the
  installed diffusers (it refuses to run otherwise; scripts from main ask for the next dev version). Scripts whose
  X is satisfied (e.g. main at 0.40.0.dev0 under diffusers 0.42.1) are left as they are.
- `no_trackers`: `Accelerator(log_with=args.report_to)` becomes `log_with=None`: no TensorBoard / W&B / ... logging
  each step (the default `--report_to tensorboard` would log wherever tensorboard is installed; it is not here).
- `torchvision`: `from torchvision import transforms` falls back, only when torchvision is not installed (it is not
  in our lock files), to a stand-in written next to the scripts with the few transforms the scripts use
  (RandomHorizontalFlip; Compose, Resize, RandomCrop / CenterCrop, ToTensor, Normalize, InterpolationMode) on PIL
  images. At 64 px and 4 images a step this is a negligible part of a step; the table says which one ran.

Not patched: hub calls (the model is a local folder; HF_HUB_OFFLINE=1 is set), validation (off: no
`--validation_prompt`), mid-run checkpoints (`--checkpointing_steps` / `--save_steps` past the last step; the final
weights are saved, as conceptkit saves its own), and train_dreambooth_lora.py's end-of-run reload of the whole
pipeline with the LoRA (it runs even without validation): these are fixed costs, in the start-up column, not the
per-step figure.

The same work for both tools: the bundled model saved as a float32 diffusers folder (`save_pretrained`; both tools
load that folder: a float16 text encoder makes the TI script diverge to NaN), the 4 images of one bundled concept
set, 64 px (the model's native size), batch 4, the same learning rate and seed, no validation, no mixed precision,
CPU only (CUDA_VISIBLE_DEVICES=""), `--threads` threads (OMP_NUM_THREADS / MKL_NUM_THREADS: neither CLI has a
threads option). TI: one vector, initialised from "object", the 27 object templates, horizontal flips p=0.5 (both
scripts' defaults). LoRA: rank 4 = alpha, UNet attention projections only (`--no-text-encoder`; the script trains
the UNet alone unless `--train_text_encoder`), instance prompt "a photo of zwx" for every image, latents sampled
from the VAE posterior, no flips, no prior preservation.

On a GPU (`--device cuda --model sd15`, the issue's GPU check; benchmarks/gpu_speed.sh runs it): both tools on
`conceptkit.models.fixtures.build_sd15_width`'s random-weight SD 1.5-sized folder, 512 px (`--resolution`), the
same images upscaled, float32 for both; the ratio is of wall time (a GPU step's time is not the process's CPU
time), and each run's peak GPU memory is the most `nvidia-smi` reports in use while it runs (sampled every 0.2 s:
both tools are measured the same way, neither is instrumented). On the CPU the peak memory column is the run's
peak RSS (its own rusage, from os.wait4).

Per-step time without start-up: every variant runs at two step counts, each run in its own subprocess, all
variants interleaved round by round; per round s/step = (t_long - t_short) / (long - short), start-up =
t_short - short x s/step; medians over the rounds. Time is the child's CPU time (user + system, from
getrusage(RUSAGE_CHILDREN)) -- the main figure, since the machine is shared -- and wall time. Never a test: tests
assert no timings (tests/test_train_speed_vs_diffusers.py checks the patchers only).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SCRIPTS = {"ti": "textual_inversion.py", "lora": "train_dreambooth_lora.py"}
NO_SAVE = 10**6  # checkpoint / save interval past any run's last step

# ---------------------------------------------------------------------------------------------------- patches


def _replace(text: str, old: str, new: str, what: str) -> str:
    """Replace the one occurrence of OLD; fail loudly when the script no longer has it."""
    count = text.count(old)
    assert count == 1, f"patch {what!r}: expected the text {old!r} once in the script, found it {count} times"
    return text.replace(old, new)


def patch_min_version(text: str, installed: str | None = None) -> str:
    """Comment out check_min_version("X") when X is newer than the installed diffusers (it would refuse to run)."""
    from packaging.version import Version

    calls = re.findall(r'^check_min_version\("([^"]+)"\)$', text, flags=re.M)
    assert len(calls) == 1, f"patch 'min_version': expected one check_min_version(\"...\") line, found {len(calls)}"
    if installed is None:
        installed = importlib.metadata.version("diffusers")
    if Version(calls[0]) <= Version(installed):
        return text
    line = f'check_min_version("{calls[0]}")'
    return _replace(text, line, f"# {line}  # benchmark patch: installed diffusers is {installed}", "min_version")


def patch_no_trackers(text: str) -> str:
    """No experiment tracker: Accelerator(log_with=None) instead of args.report_to (default tensorboard)."""
    return _replace(text, "log_with=args.report_to,", "log_with=None,  # benchmark patch: no trackers", "no_trackers")


def patch_torchvision(text: str) -> str:
    """torchvision's transforms when installed, else the stand-in written next to the script (STANDIN)."""
    new = ("try:  # benchmark patch: torchvision is not in conceptkit's lock files\n"
           "    from torchvision import transforms\n"
           "except ImportError:\n"
           "    import _transforms_standin as transforms\n")
    return _replace(text, "from torchvision import transforms\n", new, "torchvision")


PATCHES = {"min_version": patch_min_version, "no_trackers": patch_no_trackers, "torchvision": patch_torchvision}


def patch_script(text: str) -> str:
    for fn in PATCHES.values():
        text = fn(text)
    return text


# The few torchvision transforms the two scripts use, on PIL images (torchvision's semantics for these cases).
STANDIN = '''"""Stand-in for torchvision.transforms (written by benchmarks/train_speed_vs_diffusers.py)."""
import numpy as np
import torch
from PIL import Image


class InterpolationMode:
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL = {"nearest": Image.NEAREST, "nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR,
        "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:  # an int: the smaller edge to that size, keeping the aspect ratio
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, img):
        w, h = img.size
        if isinstance(self.size, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            nh, nw = self.size
        return img if (nw, nh) == (w, h) else img.resize((nw, nh), _PIL[self.interpolation])


def _crop_size(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class RandomCrop:
    def __init__(self, size):
        self.size = _crop_size(size)

    def __call__(self, img):
        (th, tw), (w, h) = self.size, img.size
        if (h, w) == (th, tw):
            return img
        i = int(torch.randint(0, h - th + 1, size=(1,)))
        j = int(torch.randint(0, w - tw + 1, size=(1,)))
        return img.crop((j, i, j + tw, i + th))


class CenterCrop:
    def __init__(self, size):
        self.size = _crop_size(size)

    def __call__(self, img):
        (th, tw), (w, h) = self.size, img.size
        i, j = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return img.crop((j, i, j + tw, i + th))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        if torch.rand(1) < self.p:
            return img.transpose(Image.FLIP_LEFT_RIGHT) if isinstance(img, Image.Image) else img.flip(-1)
        return img


class ToTensor:
    def __call__(self, img):
        a = np.array(img, dtype=np.uint8)
        a = a[:, :, None] if a.ndim == 2 else a
        return torch.from_numpy(a).permute(2, 0, 1).float().div(255)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x):
        return (x - self.mean) / self.std
'''

# ---------------------------------------------------------------------------------------------------- runs


def blob_sha(path: Path) -> str:
    """The file's git blob id (what `git rev-parse REF:PATH` prints), to say which version of a script ran."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commands(work: Path, model: str, steps: int, out: Path, args) -> dict[tuple[str, str], list[str]]:
    """The four runs' command lines on the diffusers folder MODEL, for STEPS steps, writing to OUT."""
    images, py = str(work / "images"), sys.executable
    size, batch = str(args.resolution), str(args.batch)
    common_d = ["--pretrained_model_name_or_path", model, "--resolution", size, "--train_batch_size", batch,
                "--max_train_steps", str(steps), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                "--checkpointing_steps", str(NO_SAVE), "--mixed_precision", "no", "--seed", "0",
                "--dataloader_num_workers", "0", "--output_dir", str(out)]
    common_c = [py, "-m", "conceptkit", "learn"]
    shared_c = ["--model", model, "--device", args.device, "--images", images, "--steps", str(steps), "--batch",
                batch, "--resolution", size, "--seed", "0", "--checkpoint-every", str(NO_SAVE), "--no-validation",
                "--mixed-precision", "no", "--out", str(out)]
    return {
        ("ti", "diffusers"): [py, str(work / "scripts" / SCRIPTS["ti"]), *common_d, "--train_data_dir", images,
                              "--placeholder_token", "<bench>", "--initializer_token", "object",
                              "--learnable_property", "object", "--num_vectors", "1", "--learning_rate",
                              str(args.lr_ti), "--save_steps", str(NO_SAVE)],
        ("ti", "conceptkit"): [*common_c, "ti", *shared_c, "--token", "<bench>", "--init-word", "object",
                               "--vectors", "1", "--template", "object", "--lr", str(args.lr_ti)],
        ("lora", "diffusers"): [py, str(work / "scripts" / SCRIPTS["lora"]), *common_d, "--instance_data_dir",
                                images, "--instance_prompt", "a photo of zwx", "--rank", "4", "--learning_rate",
                                str(args.lr_lora)],
        ("lora", "conceptkit"): [*common_c, "lora", *shared_c, "--prompt", "a photo of zwx", "--trigger", "zwx",
                                 "--rank", "4", "--alpha", "4", "--no-text-encoder", "--flip-p", "0",
                                 "--latents", "sample", "--lr", str(args.lr_lora)],
    }


def check_done(method: str, tool: str, steps: int, out: Path, log: str) -> None:
    """The run did the work asked: its weights file is there, and the script says how many steps it planned."""
    if tool == "diffusers":
        assert f"Total optimization steps = {steps}" in log, "the script did not plan the steps asked"
        name = "learned_embeds.safetensors" if method == "ti" else "pytorch_lora_weights.safetensors"
        assert (out / name).is_file(), f"no {name} written"
    else:
        assert any(p.suffix == ".safetensors" for p in out.rglob("*")), "no .safetensors written"


class GPUMemoryPeak:
    """The most GPU memory in use (MB, every process: runs here are one at a time) while the block runs, sampled from
    nvidia-smi every 0.2 s in a thread."""

    def __enter__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, check=True).stdout
                self.peak = max([self.peak, *(float(x) for x in out.split())])
            except (OSError, subprocess.CalledProcessError, ValueError):  # no readable nvidia-smi: say so, not 0
                self.peak = float("nan")
                return
            self._stop.wait(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed_run(cmd: list[str], env: dict, log_path: Path, gpu: bool = False) -> tuple[float, float, float, str]:
    """Run CMD to the end; its CPU seconds (user + system, its children included), wall seconds, peak memory in MB
    (GPU memory in use with GPU, else the process's peak RSS) and its output."""
    began = time.perf_counter()
    with open(log_path, "w") as log, (GPUMemoryPeak() if gpu else contextlib.nullcontext()) as gpu_peak:
        child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - began
    text = log_path.read_text(errors="replace")
    if child.returncode != 0:
        tail = "\n".join(text.splitlines()[-30:])
        sys.exit(f"failed ({child.returncode}): {' '.join(cmd)}\n--- last lines of {log_path}:\n{tail}")
    peak = gpu_peak.peak if gpu else usage.ru_maxrss / 1024
    return usage.ru_utime + usage.ru_stime, wall, peak, text


BUILD_MODEL = """import sys
import torch
from conceptkit.models.fixtures import build_sd15_width
from conceptkit.models.loading import load_pipeline

kind, folder = sys.argv[1:]
if kind == "sd15":
    build_sd15_width(folder)  # float32
else:
    pipe = load_pipeline("toy", device="cpu").to(torch.float32)
    assert all(p.dtype == torch.float32 for p in pipe.text_encoder.parameters())
    pipe.save_pretrained(folder, safe_serialization=True)
"""


def prepare(work: Path, scripts: Path, concept: str | None, model: str = "toy") -> dict:
    """The patched scripts, the float32 model folder and the images, under WORK; what was used."""
    from conceptkit.shapes.concepts import CONCEPTS, concept_folder

    (work / "scripts").mkdir(parents=True)
    used = {}
    for name in SCRIPTS.values():
        src = scripts / name
        if not src.is_file():
            sys.exit(f"--scripts {scripts}: no {name} there (diffusers' examples/.../{name}, unmodified)")
        (work / "scripts" / name).write_text(patch_script(src.read_text()))
        used[name] = blob_sha(src)
    (work / "scripts" / "_transforms_standin.py").write_text(STANDIN)

    if model in ("toy", "sd15"):
        # in a child process: this one stays free of torch, since a run's peak RSS starts at its parent's at fork
        subprocess.run([sys.executable, "-c", BUILD_MODEL, model, str(work / "model")], check=True)
        used["model_folder"] = str(work / "model")
        used["model"] = {"toy": "bundled model (float32 copy)", "sd15": "random-weight SD 1.5-sized model"}[model]
    else:  # a float32 diffusers folder (e.g. benchmarks/gpu_speed.sh's SD 1.5-sized one, built once for all checks)
        used["model_folder"], used["model"] = model, f"the folder {model}"

    chosen = [c for c in CONCEPTS if concept in (None, c.name)]
    if not chosen:
        sys.exit(f"--concept {concept}: not a bundled concept set ({', '.join(c.name for c in CONCEPTS)})")
    name, folder = chosen[0].name, Path(concept_folder(chosen[0]))
    (work / "images").mkdir()
    pictures = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:4]
    assert len(pictures) == 4, f"concept {name}: expected 4 images in {folder}, found {len(pictures)}"
    for p in pictures:
        shutil.copy(p, work / "images" / p.name)
    used["concept"] = name
    used["torchvision"] = "installed" if importlib.util.find_spec("torchvision") else "stand-in (not installed)"
    return used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scripts", type=Path, required=True,
                    help="folder with diffusers' textual_inversion.py and train_dreambooth_lora.py, unmodified")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps-short", type=int, default=10)
    ap.add_argument("--steps-long", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("ti", "lora"), help="one method (default both)")
    ap.add_argument("--concept", help="bundled concept set (default: the first)")
    ap.add_argument("--lr-ti", type=float, default=5e-3, help="both TI runs (conceptkit's default)")
    ap.add_argument("--lr-lora", type=float, default=1e-3, help="both LoRA runs (conceptkit's default)")
    ap.add_argument("--model", default="toy",
                    help="toy: the bundled model (default); sd15: random weights of SD 1.5's sizes (for --device "
                         "cuda); or a float32 diffusers folder")
    ap.add_argument("--resolution", type=int, help="training images' size (default: 64 for toy, 512 for sd15)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--work", type=Path, help="keep the work folder (scripts, model, logs) here; default: a temp")
    ap.add_argument("--json", type=Path, help="also write every run's times here")
    args = ap.parse_args()
    if not 0 < args.steps_short < args.steps_long:
        sys.exit("--steps-short must be positive and less than --steps-long")
    args.resolution = args.resolution or (64 if args.model == "toy" else 512)
    gpu = args.device == "cuda"

    work = args.work or Path(tempfile.mkdtemp(prefix="train-speed-"))
    if args.work and args.work.exists():
        sys.exit(f"--work {args.work}: exists; pass a new folder")
    try:
        used = prepare(work, args.scripts, args.concept, args.model)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
        if not gpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        (work / "logs").mkdir()
        methods = [args.only] if args.only else ["ti", "lora"]
        variants = [(m, t) for m in methods for t in ("diffusers", "conceptkit")]
        runs = {(v, s): [] for v in variants for s in (args.steps_short, args.steps_long)}
        for r in range(args.rounds):
            for steps in (args.steps_short, args.steps_long):
                for v in variants:
                    out = work / "out" / f"{v[0]}-{v[1]}-{steps}-r{r}"
                    cmd = commands(work, used["model_folder"], steps, out, args)[v]
                    cpu, wall, peak, log = timed_run(cmd, env, work / "logs" / f"{out.name}.log", gpu)
                    check_done(*v, steps, out, log)
                    runs[(v, steps)].append((cpu, wall, peak))
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"round {r + 1}/{args.rounds}: {v[0]} {v[1]:10s} {steps:4d} steps: CPU {cpu:7.2f} s, "
                          f"wall {wall:7.2f} s, peak {peak:7.0f} MB", file=sys.stderr, flush=True)
        report(args, used, variants, runs)
        if args.json:
            args.json.write_text(json.dumps({"used": used, "args": {k: str(v) for k, v in vars(args).items()},
                                             "runs": [{"method": v[0], "tool": v[1], "steps": s, "cpu_s": c,
                                                       "wall_s": w, "peak_mb": m} for (v, s), rr in runs.items()
                                                      for c, w, m in rr]},
                                            indent=1))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def report(args, used: dict, variants, runs) -> None:
    short, long = args.steps_short, args.steps_long
    span = long - short
    gpu = args.device == "cuda"
    main_k = 1 if gpu else 0  # the ratio's time: wall on a GPU, the process's CPU time on the (shared) CPUs

    def per_round(v, k):  # k 0: CPU, 1: wall; per round (s/step, start-up s)
        slopes = [(b[k] - a[k]) / span for a, b in zip(runs[(v, short)], runs[(v, long)])]
        starts = [a[k] - short * slope for a, slope in zip(runs[(v, short)], slopes)]
        return slopes, starts

    def med(xs):
        return statistics.median(xs)

    if gpu:
        import torch

        where = f"{torch.cuda.get_device_name()} (float32)"
    else:
        where = f"{args.threads} thread(s)"
    print(f"diffusers {_diffusers_version()} example scripts (git blob {used[SCRIPTS['ti']][:10]} "
          f"{SCRIPTS['ti']}, {used[SCRIPTS['lora']][:10]} {SCRIPTS['lora']}) vs conceptkit; {used['model']}, "
          f"concept {used['concept']}, {args.resolution} px, batch {args.batch}, {where}, s/step = "
          f"(t_{long} - t_{short}) / {span}, {args.rounds} interleaved round(s), medians; torchvision: "
          f"{used['torchvision']}\n")
    memory = "peak GPU MB in use" if gpu else "peak RSS MB"
    print(f"| method | tool | CPU s/step (min-max) | wall s/step (min-max) | start-up CPU s | start-up wall s | "
          f"{memory} (long run) | conceptkit / diffusers ({'wall' if gpu else 'CPU'}) | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        cpu, cpu_start = per_round(v, 0)
        wall, wall_start = per_round(v, 1)
        ratio, target = "", ""
        if v[1] == "conceptkit":
            ours = med(per_round(v, main_k)[0])
            base = med(per_round((v[0], "diffusers"), main_k)[0])
            ratio, target = f"{ours / base:.2f}" if base > 0 else "n/a", "<= 0.5"
        name = {("ti", "diffusers"): "`textual_inversion.py`", ("ti", "conceptkit"): "`learn ti`",
                ("lora", "diffusers"): "`train_dreambooth_lora.py`", ("lora", "conceptkit"): "`learn lora`"}[v]
        print(f"| {v[0].upper() if v[0] == 'ti' else 'LoRA'} | {name} | {med(cpu):.3f} ({min(cpu):.3f}-"
              f"{max(cpu):.3f}) | {med(wall):.3f} ({min(wall):.3f}-{max(wall):.3f}) | {med(cpu_start):.1f} | "
              f"{med(wall_start):.1f} | {max(r[2] for r in runs[(v, long)]):.0f} | {ratio} | {target} |")
    print("\n| method | tool | steps | median CPU s | median wall s |")
    print("|---|---|---|---|---|")
    for v in variants:
        for s in (short, long):
            rr = runs[(v, s)]
            print(f"| {v[0]} | {v[1]} | {s} | {med(r[0] for r in rr):.2f} | {med(r[1] for r in rr):.2f} |")
    if any(slope <= 0 for v in variants for slope in per_round(v, main_k)[0]):
        print("\nA round gave s/step <= 0: the extra steps of the long runs took less than the start-up's spread; "
              "widen --steps-long - --steps-short.")
    print(f"\nload average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


def _diffusers_version() -> str:
    return importlib.metadata.version("diffusers")


if __name__ == "__main__":
    main()
