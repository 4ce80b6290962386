"""The opt-in sampling speed-ups of issue 21 (generate/autocast.py, generate/compiled.py): off, the images are
bit for bit those of a plain run; bf16 stays within a few pixel levels; compile computes the same images; the UNet
is its eager self again after each. Their speed is measured by benchmarks/generate_speed.py, not here."""
import numpy as np
import pytest
import torch

from conceptkit.cli import main
from conceptkit.errors import UserError
from conceptkit.generate import autocast
from conceptkit.generate.autocast import bf16_unet, cpu_has_bf16
from conceptkit.generate.compiled import compiled_unet
from conceptkit.generate.images import generate
from conceptkit.models.loading import load_pipeline

PROMPT = "a large red striped circle in the center, on a navy background"


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy", device="cpu")


def pixels(result):
    return np.stack([np.asarray(i) for i in result.images]).astype(int)


def test_cpu_flags_are_read_from_cpuinfo():
    assert cpu_has_bf16("processor : 0\nflags : fpu sse avx512f avx512_bf16\n")
    assert cpu_has_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_bf16("flags : fpu sse avx2 avx512f\nbugs : avx512_bf16\n")


def test_bf16_is_close_to_float32_and_off_is_bitwise_the_default(toy, monkeypatch):
    monkeypatch.setattr(autocast, "cpu_has_bf16", lambda: True)  # emulated where the CPU lacks it: only slower
    default = pixels(generate(toy, PROMPT, num_images=2, steps=5, progress=False))
    off = pixels(generate(toy, PROMPT, num_images=2, steps=5, progress=False, bf16=False, compile=False))
    on = pixels(generate(toy, PROMPT, num_images=2, steps=5, progress=False, bf16=True))
    assert np.array_equal(default, off)
    diff = np.abs(on - default)
    # at 5 steps (DDIM's large jumps): a few pixels move by tens of levels, most by 0-1 (at 30 steps: max 6)
    assert 0 < diff.max() <= 48 and diff.mean() < 1.0, (diff.max(), diff.mean())
    assert "forward" not in toy.unet.__dict__  # the class's forward again
    assert np.array_equal(default, pixels(generate(toy, PROMPT, num_images=2, steps=5, progress=False)))


def test_bf16_runs_the_unet_in_bf16_only_within_the_block(toy, monkeypatch):
    monkeypatch.setattr(autocast, "cpu_has_bf16", lambda: True)
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 77, toy.unet.config.cross_attention_dim)
    with bf16_unet(toy.unet):
        assert toy.unet(x, t, h).sample.dtype == torch.bfloat16
    assert toy.unet(x, t, h).sample.dtype == torch.float32


def test_bf16_is_refused_on_a_cpu_without_it(toy, monkeypatch, capsys):
    monkeypatch.setattr(autocast, "cpu_has_bf16", lambda: False)
    with pytest.raises(UserError, match="no native bf16"):
        generate(toy, PROMPT, steps=1, progress=False, bf16=True)
    assert "forward" not in toy.unet.__dict__


def test_compiled_unet_gives_the_same_images_and_is_compiled_once(sd_tiny_dir):
    pipe = load_pipeline(str(sd_tiny_dir), device="cpu")
    default = pixels(generate(pipe, "a red star", num_images=2, steps=2, progress=False))
    with compiled_unet(pipe.unet, backend="eager"):
        compiled = pipe.unet.forward
        assert compiled is not type(pipe.unet).forward
        got = pixels(generate(pipe, "a red star", num_images=2, steps=2, progress=False))
    assert np.array_equal(default, got)
    assert "forward" not in pipe.unet.__dict__
    with compiled_unet(pipe.unet, backend="eager"):
        assert pipe.unet.forward is compiled


def test_cli_flags_reach_generate(toy_model_env, tmp_path, monkeypatch):
    seen = {}
    import conceptkit.generate.images as images

    real = images.generate

    def spy(*args, **kwargs):
        seen.update(bf16=kwargs.get("bf16"), compile=kwargs.get("compile"))
        return real(*args, **{**kwargs, "bf16": False, "compile": False})

    monkeypatch.setattr(images, "generate", spy)
    assert main(["generate", "--prompt", "a red star", "--steps", "1", "--bf16", "--compile", "--out",
                 str(tmp_path / "g")]) == 0
    assert seen == {"bf16": True, "compile": True}


def test_bf16_and_compile_together_run_the_compiled_unet_under_bf16(toy, monkeypatch):
    """Both flags: the compiled forward runs under autocast (it once replaced the autocast wrapper, silently
    dropping bf16), and the UNet is its eager self afterwards."""
    import conceptkit.generate.compiled as compiled

    monkeypatch.setattr(autocast, "cpu_has_bf16", lambda: True)
    calls = []
    monkeypatch.setattr(compiled.torch, "compile", lambda fn, **kw: (lambda *a, **k: calls.append(1) or fn(*a, **k)))
    dtypes = []
    hook = toy.unet.register_forward_hook(lambda module, args, out: dtypes.append(out[0].dtype))
    try:
        generate(toy, PROMPT, num_images=1, steps=2, progress=False, bf16=True, compile=True)
    finally:
        hook.remove()
        toy.unet.__dict__.pop(compiled.ATTRIBUTE, None)
    assert calls and dtypes and set(dtypes) == {torch.bfloat16}
    assert "forward" not in toy.unet.__dict__
