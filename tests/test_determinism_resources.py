"""Determinism (same seed → same PNG bytes on CPU, in one process and across two), large images (memory savers
switched on, image size unchanged), and out-of-memory errors turned into one line of advice."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
import torch

from conceptkit import cli
from conceptkit.generate import images as gen_images
from conceptkit.generate.images import generate
from conceptkit.models.loading import load_pipeline
from conceptkit.resources import LOW_MEMORY_FACTOR, is_large, is_out_of_memory

PROMPT = "a large red striped circle in the center, on a navy background"
SAVERS = {"enable_slicing", "enable_tiling"}  # + attention slicing where torch has no SDPA (torch < 2)


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def generate_argv(out: Path) -> list[str]:
    return ["generate", "--prompt", PROMPT, "--seed", "3", "--num-images", "2", "--steps", "2", "--out", str(out)]


def test_same_seed_same_png_bytes_in_process_and_across_processes(tmp_path):
    assert cli.main(generate_argv(tmp_path / "a")) == 0
    assert cli.main(generate_argv(tmp_path / "b")) == 0
    first = png_bytes(tmp_path / "a")
    assert len(first) == 3 and first == png_bytes(tmp_path / "b")  # 2 images + grid, byte for byte
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    code = ("import sys, torch; torch.set_num_threads(1); from conceptkit.cli import main; "
            f"sys.exit(main({generate_argv(tmp_path / 'c')!r}))")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, timeout=300)
    assert png_bytes(tmp_path / "c") == first


@pytest.fixture(scope="module")
def fixture_pipe(sd_tiny_dir):
    return load_pipeline(str(sd_tiny_dir))


def test_large_images_turn_on_the_memory_savers(fixture_pipe, monkeypatch):
    pipe = fixture_pipe
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor  # 64 on the fixture
    calls = []
    for owner, name in ((pipe.vae, "enable_tiling"), (pipe.vae, "enable_slicing"), (pipe, "enable_attention_slicing")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    seen = []
    monkeypatch.setattr(gen_images, "tqdm", lambda *a, **k: _Bar(pipe, seen))

    out = generate(pipe, PROMPT, steps=1, num_images=2, height=native, width=native, progress=False)
    assert calls == [] and out.images[0].size == (native, native) and seen == [False]

    big = 160  # 160² > 4 x 64²
    assert is_large(pipe, big, big) and not is_large(pipe, 2 * native, 2 * native)
    seen.clear()
    out = generate(pipe, PROMPT, steps=1, num_images=2, height=big, width=big - 32, progress=False)
    assert set(calls) == SAVERS
    assert seen == [True, True]  # on during sampling, one image per batch (2 batches)
    assert [im.size for im in out.images] == [(big - 32, big)] * 2
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing  # off again afterwards

    calls.clear()
    generate(pipe, PROMPT, steps=1, height=native, width=native, progress=False, low_memory=True)
    assert set(calls) == SAVERS and LOW_MEMORY_FACTOR == 4


def test_attention_slicing_only_without_sdpa(fixture_pipe, monkeypatch):
    """Sliced attention replaces SDPA (which never materialises the attention matrix): used only without it."""
    from conceptkit import resources

    monkeypatch.setattr(resources, "sdpa_available", lambda: False)
    with resources.memory_savers(fixture_pipe, True):
        processors = {type(p).__name__ for p in fixture_pipe.unet.attn_processors.values()}
    assert processors == {"SlicedAttnProcessor"}
    assert {type(p).__name__ for p in fixture_pipe.unet.attn_processors.values()} != {"SlicedAttnProcessor"}


class _Bar:
    """Stands in for tqdm: records, once per batch, whether VAE tiling was on while sampling."""

    def __init__(self, pipe, seen):
        self.pipe, self.seen, self.n = pipe, seen, 0

    def update(self, _n):
        if self.n == 0 or self.n % 1 == 0:
            self.seen.append(bool(self.pipe.vae.use_tiling))
        self.n += 1

    def close(self):
        pass


def test_low_memory_gives_the_same_image_at_native_size(fixture_pipe):
    """At the native size tiling does not split the image, so --low-memory changes the picture by a few levels (of
    255) at most (the VAE decodes one image at a time; float sums may be ordered differently)."""
    import numpy as np

    pipe = fixture_pipe
    a = generate(pipe, PROMPT, steps=2, progress=False, low_memory=False).images[0]
    b = generate(pipe, PROMPT, steps=2, progress=False, low_memory=True).images[0]
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    assert a.size == b.size and diff.max() <= 4 and diff.mean() < 0.5


OOMS = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
]


@pytest.mark.parametrize("error", OOMS, ids=["cuda", "cpu-allocator", "memory-error"])
@pytest.mark.parametrize("command", ["generate", "learn-ti"])
def test_out_of_memory_is_one_line_of_advice(error, command, monkeypatch, capsys, tmp_path):
    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr("conceptkit.models.loading.load_pipeline", lambda *a, **k: object())
    if command == "generate":
        monkeypatch.setattr(gen_images, "generate", boom)
        argv = ["generate", "--prompt", PROMPT, "--out", str(tmp_path / "out")]
        advice = "--low-memory"
    else:
        monkeypatch.setattr("conceptkit.learn.textual_inversion.learn_textual_inversion", boom)
        monkeypatch.setattr("conceptkit.learn.distributed.process_device", lambda d: "cpu", raising=False)
        # --no-validation: else the run's first line announces its validation before the error line
        images = tmp_path / "images"  # an image, so the folder passes the checks made before torch loads
        images.mkdir()
        Image.new("RGB", (8, 8)).save(images / "0.png")
        argv = ["learn", "ti", "--images", str(images), "--token", "<x>", "--no-validation",
                "--out", str(tmp_path / "out")]
        advice = "--batch"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: out of ") and len(err.splitlines()) == 1 and advice in err and "Traceback" not in err


def test_other_runtime_errors_still_raise(monkeypatch, tmp_path):
    monkeypatch.setattr("conceptkit.models.loading.load_pipeline", lambda *a, **k: object())
    monkeypatch.setattr(gen_images, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["generate", "--prompt", PROMPT, "--out", str(tmp_path)])
    assert is_out_of_memory(OOMS[0]) and not is_out_of_memory(RuntimeError("shape mismatch"))
