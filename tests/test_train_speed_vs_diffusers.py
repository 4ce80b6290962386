"""benchmarks/train_speed_vs_diffusers.py patches diffusers' example scripts by string replacement: each patch must
apply to the text it expects and fail loudly, not silently, when a script no longer has it (fake script text here;
the real scripts are not part of the repository)."""
import importlib.util
import sys
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
