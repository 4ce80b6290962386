"""benchmarks/train_speed_vs_diffusers.py patches diffusers' example scripts by string replacement: each patch must
apply to the text it expects and fail loudly, not silently, when a script no longer has it (fake script text here;
the real scripts are not part of the repository)."""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed_vs_diffusers.py"
_spec = importlib.util.spec_from_file_location("train_speed_vs_diffusers", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

FAKE = '''import torch
from torchvision import transforms
from diffusers.utils import check_min_version

check_min_version("0.40.0.dev0")


def main(args):
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_config=accelerator_project_config,
    )
'''


def test_each_patch_applies_to_the_expected_text():
    out = bench.patch_script(FAKE)
    assert "log_with=None," in out and "log_with=args.report_to" not in out
    assert "import _transforms_standin as transforms" in out and "    from torchvision import transforms\n" in out
    compile(out, "fake.py", "exec")  # still Python


@pytest.mark.parametrize("name, missing", [
    ("no_trackers", "log_with=args.report_to,"),
    ("torchvision", "from torchvision import transforms\n"),
    ("min_version", 'check_min_version("0.40.0.dev0")'),
])
def test_each_patch_fails_loudly_when_its_text_is_missing(name, missing):
    text = FAKE.replace(missing, "")
    with pytest.raises(AssertionError, match=name):
        bench.PATCHES[name](text)
    with pytest.raises(AssertionError, match=name):  # and the whole patching with it
        bench.patch_script(text)


def test_patches_refuse_text_found_twice():
    with pytest.raises(AssertionError, match="2 times"):
        bench.patch_no_trackers(FAKE + "log_with=args.report_to,\n")


def test_min_version_is_only_removed_when_the_installed_diffusers_is_older():
    assert bench.patch_min_version(FAKE, installed="0.42.1") == FAKE
    out = bench.patch_min_version(FAKE, installed="0.39.0")
    assert '\n# check_min_version("0.40.0.dev0")' in out and '\ncheck_min_version(' not in out


def test_transforms_standin(tmp_path, monkeypatch):
    (tmp_path / "_transforms_standin.py").write_text(bench.STANDIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "_transforms_standin", raising=False)
    import _transforms_standin as t

    # train_dreambooth_lora.py builds --image_interpolation_mode's choices from dir(InterpolationMode)
    assert "lanczos" in [f.lower() for f in dir(t.InterpolationMode) if not f.startswith("__")]
    pixels = np.arange(64 * 32 * 3, dtype=np.uint8).reshape(32, 64, 3)
    img = Image.fromarray(pixels)
    chain = t.Compose([t.Resize(16, interpolation=t.InterpolationMode.LANCZOS), t.RandomCrop(16), t.ToTensor(),
                       t.Normalize([0.5], [0.5])])
    x = chain(img)
    assert x.shape == (3, 16, 16) and -1 <= float(x.min()) and float(x.max()) <= 1
    same = Image.fromarray(pixels[:, :32])  # already the size: Resize and RandomCrop leave it as it is
    assert np.array_equal(np.asarray(t.RandomCrop(32)(t.Resize(32)(same))), pixels[:, :32])
    assert np.array_equal(np.asarray(t.RandomHorizontalFlip(p=1.0)(img)), pixels[:, ::-1])
    assert np.array_equal(np.asarray(t.RandomHorizontalFlip(p=0.0)(img)), pixels)


def test_timed_run_reports_the_childs_own_peak_memory_and_refuses_a_failed_run(tmp_path):
    # each run's peak RSS is its own (os.wait4), not the largest of every child so far (RUSAGE_CHILDREN); a child
    # starts at its parent's peak, so the benchmark's own process stays small (no torch): measured from one like it
    probe = f"""import importlib.util, sys
spec = importlib.util.spec_from_file_location("bench", {str(_PATH)!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
big = [sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"]
small = [sys.executable, "-c", "pass"]
print(bench.timed_run(big, {{}}, __import__("pathlib").Path({str(tmp_path / "big.log")!r}))[2],
      bench.timed_run(small, {{}}, __import__("pathlib").Path({str(tmp_path / "small.log")!r}))[2])
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    big_peak, small_peak = map(float, out.split())
    assert big_peak > 300 and small_peak < 100, (big_peak, small_peak)
    with pytest.raises(SystemExit, match="failed \\(3\\)"):
        bench.timed_run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], {}, tmp_path / "x.log")


def test_gpu_memory_peak_is_the_most_nvidia_smi_reported_while_the_block_ran(tmp_path, monkeypatch):
    # a stand-in nvidia-smi reporting 100, then 2500, then 700 MB in use on one GPU
    counter, fake = tmp_path / "n", tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\nn=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}\n"
                    "case $n in 0) echo 100;; 1) echo 2500;; *) echo 700;; esac\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with bench.GPUMemoryPeak() as peak:
        deadline = time.time() + 10
        while (not counter.exists() or int(counter.read_text()) < 4) and time.time() < deadline:
            time.sleep(0.05)
    assert peak.peak == 2500
