"""The base-model trainer: exact latent normalisation, resume equals an uninterrupted run, export loads in diffusers."""
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from conceptkit.errors import UserError
from conceptkit.shapes import train_base
from conceptkit.shapes.train_base import Recipe, build_vae, normalise_latents

TINY = dict(vae_crop_steps=2, vae_full_steps=1, vae_batch=4, vae_pool=16, latent_pool=32, batch=4,
            checkpoint_every=2, warmup=2)


def test_latent_normalisation_is_exact_and_gives_unit_channels():
    torch.manual_seed(0)
    vae = build_vae().eval()
    x = torch.rand(6, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(x).latent_dist.mean).sample
        normalise_latents(vae, torch.rand(32, 3, 64, 64) * 2 - 1)
        z = vae.encode(torch.rand(32, 3, 64, 64) * 2 - 1).latent_dist.mean
        after = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(4), atol=0.15)
    assert vae.config.scaling_factor == 1.0


def _state(run):
    return torch.load(run / "unet_state.pt", weights_only=True)


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    train_base.train(straight, Recipe(unet_steps=4, grounding_weight=0.1, **TINY))
    resumed = tmp_path / "resumed"
    train_base.train(resumed, Recipe(unet_steps=2, grounding_weight=0.1, **TINY))
    assert _state(resumed)["step"] == 2
    train_base.train(resumed, Recipe(unet_steps=4, **TINY), resume=True)  # the run's own recipe is kept
    a, b = _state(straight), _state(resumed)
    assert a["step"] == b["step"] == 4
    for key in a["unet"]:
        assert torch.equal(a["unet"][key], b["unet"][key]), key
    for key in a["text_encoder"]:
        assert torch.equal(a["text_encoder"][key], b["text_encoder"][key]), key
    with pytest.raises(UserError, match="--resume"):
        train_base.train(straight, Recipe(unet_steps=4, **TINY))  # never silently overwrite a run

    out = train_base.export(straight, tmp_path / "export")
    card = json.loads((out / "training.json").read_text())
    assert card["unet_steps"] == 4
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    pipe = StableDiffusionPipeline.from_pretrained(out)  # stored in float16, loads in float32 with no dtype given
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)

    # --export-weights raw: the trained weights themselves, not their EMA; --export-checkpoint: a copied state
    copy = tmp_path / "state-copy.pt"
    copy.write_bytes((straight / "unet_state.pt").read_bytes())
    raw = train_base.export(straight, tmp_path / "raw", weights="raw", checkpoint=copy)
    assert json.loads((raw / "training.json").read_text())["weights"] == "raw"
    raw_unet = StableDiffusionPipeline.from_pretrained(raw).unet.state_dict()
    ema_unet = pipe.unet.state_dict()
    assert all(torch.equal(raw_unet[k], a["unet"][k].half().float()) for k in raw_unet)
    assert any(not torch.equal(raw_unet[k], ema_unet[k]) for k in raw_unet)
    with pytest.raises(UserError, match="no UNet checkpoint"):
        train_base.export(straight, tmp_path / "none", checkpoint=tmp_path / "missing.pt")


def test_a_lost_run_restarts_from_its_shipped_weights(tmp_path):
    run = tmp_path / "run"
    train_base.train(run, Recipe(unet_steps=2, **TINY))
    shipped = train_base.export(run, tmp_path / "shipped")
    seeded = train_base.seed_run_from_export(tmp_path / "seeded", shipped)
    state = _state(seeded)
    assert state["step"] == 2 and "opt" not in state
    exported = StableDiffusionPipeline.from_pretrained(shipped, dtype=torch.float32).unet.state_dict()
    for key, value in exported.items():
        assert torch.equal(state["unet"][key], value), key
    train_base.train(seeded, Recipe(unet_steps=3, **TINY), resume=True)
    after = _state(seeded)
    assert after["step"] == 3 and after["warm_start"] == 2
    assert not torch.equal(after["unet"]["conv_in.weight"], state["unet"]["conv_in.weight"])
    # a resumed run may change its EMA window (not its data, draws or loss): the EMA state and recipe.json say so
    with pytest.raises(UserError, match="--set lr: a resumed run keeps its recipe"):
        train_base.train(seeded, Recipe(unet_steps=4, **TINY), resume=True, changes={"lr": 1.0, "ema_decay": 0.9})
    assert _state(seeded)["step"] == 3
    train_base.train(seeded, Recipe(unet_steps=4, **TINY), resume=True, changes={"ema_decay": 0.9})
    assert _state(seeded)["ema"]["decay"] == 0.9
    assert json.loads((seeded / "recipe.json").read_text())["ema_decay"] == 0.9


def test_band_losses_average_the_last_logged_rows(tmp_path):
    log = tmp_path / "unet_log.jsonl"
    rows = [{"step": 50 * (i + 1), "loss": 0.1, "band_loss": [float(i)] * 7 + [2.0 * i]} for i in range(4)]
    log.write_text("\n".join(json.dumps(r) for r in [{"step": 0, "loss": 1.0}] + rows) + "\n")
    got = train_base.band_losses(log, rows=2)
    assert got["steps"] == [101, 200]
    assert list(got["bands"]) == ["0-124", "125-249", "250-374", "375-499", "500-624", "625-749", "750-874",
                                  "875-999"]
    assert got["bands"]["0-124"] == 2.5 and got["bands"]["875-999"] == 5.0
    assert train_base.band_losses(tmp_path / "missing.jsonl") is None
    assert train_base.band_losses(log, rows=2, up_to=150)["steps"] == [51, 150]  # an exported older checkpoint


def test_the_pixel_loss_trains_and_is_logged(tmp_path):
    train_base.train(tmp_path / "run", Recipe(unet_steps=50, grounding_weight=0.1, grounding_pixel_weight=0.1,
                                              **{**TINY, "checkpoint_every": 50}))
    rows = [json.loads(line) for line in (tmp_path / "run" / "unet_log.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "pixel_loss" in r]
    assert logged and 0 < logged[-1]["pixel_loss"] < 10
    with pytest.raises(UserError, match="grounding_weight > 0"):  # alone it would never run: refused, not ignored
        train_base.train(tmp_path / "alone", Recipe(unet_steps=1, grounding_pixel_weight=0.1, **TINY))
    assert not (tmp_path / "alone").exists()


def test_the_lr_anneal_ends_a_run_at_zero_and_leaves_earlier_steps_alone():
    r = Recipe(lr=1e-3, warmup=10, unet_steps=1000, lr_decay_steps=200)
    assert train_base.unet_lr(r, 0) == pytest.approx(1e-4)  # warm-up still applies
    assert train_base.unet_lr(r, 500) == pytest.approx(1e-3)  # constant before the anneal
    assert train_base.unet_lr(r, 800) == pytest.approx(1e-3)
    assert train_base.unet_lr(r, 900) == pytest.approx(5e-4)  # halfway down
    assert train_base.unet_lr(r, 999) == pytest.approx(5e-6)
    # a resumed run raised to more steps anneals over its new last steps (warm-up counted from its own start)
    assert train_base.unet_lr(Recipe(lr=1e-3, warmup=10, unet_steps=1200, lr_decay_steps=200), 900, 0) == pytest.approx(1e-3)
    assert train_base.unet_lr(Recipe(lr=1e-3, warmup=10, unet_steps=1000), 999) == pytest.approx(1e-3)  # off by default
    assert "lr_decay_steps" in train_base.CHANGEABLE_ON_RESUME
