"""Captioned PromptNet pre-training (--captions scene) and --init-from, on the tiny SD fixture."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from promptnet_helpers import fixed_batch

from conceptkit.errors import UserError
from conceptkit.learn import promptnet as trainer
from conceptkit.learn.promptnet import init_promptnet, pretrain_promptnet, promptnet_loss, read_scenes, scene_caption
from conceptkit.learn.promptnet_config import PretrainConfig
from conceptkit.models.loading import load_pipeline
from conceptkit.profusion.image_encoders import LatentPatchEncoder
from conceptkit.profusion.promptnet import PromptNet
from conceptkit.profusion.prompts import prompt_batch_ids, tokenize_with_slot, training_ids
from conceptkit.profusion.saved import load_promptnet
from conceptkit.shapes.captions import placeholder_caption
from conceptkit.shapes.dataset import scenes, write_image_folder
from conceptkit.shapes.world import Obj, Scene

PRETRAIN = {"batch": 2, "validation_prompts": (), "checkpoint_every": 100, "lr": 1e-3}


@pytest.fixture(scope="module")
def sd32(sd_tiny_dir):
    return load_pipeline(str(sd_tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory):
    """4 rendered one-object scenes with their metadata.jsonl, as `conceptkit shapes sample --p-pair 0` writes."""
    return write_image_folder(tmp_path_factory.mktemp("scenes") / "images", scenes(4, seed=3, p_pair=0.0))


def one(background, shape, color, pattern, position, size):
    return Scene(background, (Obj(shape, color, pattern, position, size),))


@pytest.mark.parametrize("scene, expected", [
    (one("brown", "circle", "red", "striped", "left", "large"), "a large S* on the left, on a brown background"),
    (one("navy", "star", "blue", "plain", "bottom", "small"), "a small S* at the bottom, on a navy background"),
    (one("white", "cross", "pink", "dotted", "top", "large"), "a large S* at the top, on a white background"),
    (one("gray", "moon", "green", "checkered", "right", "small"), "a small S* on the right, on a gray background"),
    (one("teal", "square", "yellow", "plain", "center", "small"), "a small S* in the center, on a teal background"),
    (one("teal", "square", "yellow", "plain", "center", "medium"), "a S* in the center, on a teal background"),
])
def test_placeholder_captions_are_the_evaluations_prompt_form(scene, expected):
    assert placeholder_caption(scene) == expected
    assert scene_caption(scene) == expected


def test_the_evaluations_compositional_prompts_are_captions():
    from conceptkit.evaluate.ti import COMPOSITIONAL

    for template, r in COMPOSITIONAL:
        assert placeholder_caption(one(r["background"], "circle", "red", "plain", r["position"], r["size"])) == \
            template.format("S*")


def test_a_mirrored_image_swaps_left_and_right_only():
    left = one("brown", "circle", "red", "plain", "left", "large")
    assert scene_caption(left, flipped=True) == "a large S* on the right, on a brown background"
    top = one("navy", "circle", "red", "plain", "top", "small")
    assert scene_caption(top, flipped=True) == scene_caption(top)


def test_prompt_batch_ids_are_each_prompts_ids_padded_to_the_longest(sd32):
    tok = sd32.tokenizer
    prompts = ["a large S* on the left, on a brown background", "a S* at the top, on a navy background"]
    ids, slots = prompt_batch_ids(tok, prompts)
    for k, p in enumerate(prompts):
        row, slot = tokenize_with_slot(tok, p, pad=False)
        assert slots[k].item() == slot
        assert torch.equal(ids[k, : len(row)], row)
        assert (ids[k, len(row):] == tok.pad_token_id).all()
    padded, _ = prompt_batch_ids(tok, prompts, pad=True)
    assert padded.shape == (2, tok.model_max_length)


# Computed with the code before per-row prompts (commit 166b9bf) on this fixture, seed 0, one thread.
OLD_LOSS = {False: 1.1831539869308472, True: 1.186856985092163}
OLD_PRETRAIN_LOSSES = [1.264800786972046, 1.1132501363754272]


@pytest.mark.parametrize("pad", [False, True])
def test_the_fixed_prompt_loss_is_bit_identical_to_the_old_code_and_equals_per_row_copies(sd32, pad):
    encoder = LatentPatchEncoder()
    torch.manual_seed(0)
    net = PromptNet.from_unet(sd32.unet, encoder.embed_dim, 768)
    scheduler = DDPMScheduler.from_config(sd32.scheduler.config)
    batch = fixed_batch(sd32, encoder)
    ids, slot = training_ids(sd32.tokenizer, pad=pad)
    rows, slots = prompt_batch_ids(sd32.tokenizer, ["a photo of S*"] * 2, pad=pad)
    with torch.no_grad():
        loss = promptnet_loss(sd32, scheduler, net, ids=ids, slot=slot, l2_reg=0.0, **batch).item()
        per_row = promptnet_loss(sd32, scheduler, net, ids=rows, slot=slots, l2_reg=0.0, **batch).item()
    assert loss == OLD_LOSS[pad]
    assert per_row == loss


def test_captions_none_pretraining_is_bit_identical_to_the_old_code(sd32, images_dir, tmp_path):
    result = pretrain_promptnet(sd32, images_dir, tmp_path / "run", PretrainConfig(steps=2, **PRETRAIN),
                                progress=False)
    assert result.losses == OLD_PRETRAIN_LOSSES
    assert json.loads((tmp_path / "run" / "training.json").read_text())["config"]["captions"] == "none"


def spy_prompts(monkeypatch):
    seen = []
    real = trainer.promptnet_loss

    def spy(*args, ids, slot, **kwargs):
        seen.append((ids.clone(), torch.as_tensor(slot).clone()))
        return real(*args, ids=ids, slot=slot, **kwargs)

    monkeypatch.setattr(trainer, "promptnet_loss", spy)
    return seen


def test_captioned_pretraining_runs_on_each_images_caption_and_stores_captions(sd32, scene_dir, tmp_path,
                                                                               monkeypatch):
    seen = spy_prompts(monkeypatch)
    out = tmp_path / "run"
    result = pretrain_promptnet(sd32, scene_dir, out, PretrainConfig(steps=2, captions="scene", flip_p=0.5,
                                                                     **PRETRAIN), progress=False)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert json.loads((out / "training.json").read_text())["config"]["captions"] == "scene"
    assert load_promptnet(out, sd32).meta["captions"] == "scene"
    # every row's ids are one of the folder's captions (or its mirror image's), S* at its slot
    files = sorted(scene_dir.glob("*.png"))
    captions = {scene_caption(s, f) for s in read_scenes(scene_dir, files) for f in (False, True)}
    allowed = {tuple(tokenize_with_slot(sd32.tokenizer, c, pad=False)[0].tolist()) for c in captions}
    assert len(seen) == 2
    for ids, slots in seen:
        assert ids.shape[0] == 2 and slots.shape == (2,)
        for row in ids.tolist():
            assert tuple(row) in allowed  # one-object captions are one length here: no padding
    # a resume must keep the captions setting
    with pytest.raises(UserError, match="captions"):
        pretrain_promptnet(sd32, scene_dir, out, PretrainConfig(steps=3, **PRETRAIN), resume=True, progress=False)
    exported = trainer.export_pretrain_checkpoint(sd32, out, tmp_path / "exported")
    assert load_promptnet(exported, sd32).meta["captions"] == "scene"


def test_captions_scene_without_metadata_is_a_one_line_error(sd32, images_dir, tmp_path):
    with pytest.raises(UserError) as e:
        pretrain_promptnet(sd32, images_dir, tmp_path / "run", PretrainConfig(steps=2, captions="scene", **PRETRAIN),
                           progress=False)
    message = str(e.value)
    assert "\n" not in message and str(images_dir) in message and "--p-pair 0" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_captions_scene_refuses_two_object_scenes(tmp_path):
    folder = write_image_folder(tmp_path / "pairs", scenes(3, seed=1, p_pair=1.0))
    with pytest.raises(UserError, match="2 objects"):
        read_scenes(folder, sorted(folder.glob("*.png")))


def test_init_from_starts_from_the_exported_weights_with_a_fresh_optimizer(sd32, images_dir, scene_dir, tmp_path):
    first = tmp_path / "first"
    pretrain_promptnet(sd32, images_dir, first, PretrainConfig(steps=2, **PRETRAIN), progress=False)
    start, _ = init_promptnet(sd32, first, None, PretrainConfig().projection_channels)
    saved = load_promptnet(first, sd32).promptnet.state_dict()
    assert all(torch.equal(start.state_dict()[k], saved[k]) for k in saved)
    out = tmp_path / "captioned"
    cfg = PretrainConfig(steps=1, captions="scene", init_from=str(first), **PRETRAIN)
    pretrain_promptnet(sd32, scene_dir, out, cfg, progress=False)
    config = json.loads((out / "training.json").read_text())["config"]
    assert config["init_from"] == str(first) and config["captions"] == "scene"
    assert load_promptnet(out, sd32).meta["init_from"] == str(first)
    ckpt = trainer.checkpoint_tensors(next((out / "checkpoints").glob("step-*.safetensors")), prefix="adam_step/")
    assert ckpt and all(v.item() == 1 for v in ckpt.values())  # Adam began at this run's first step
    with pytest.raises(UserError, match="not a PromptNet folder"):
        pretrain_promptnet(sd32, scene_dir, tmp_path / "bad", PretrainConfig(steps=1, init_from=str(images_dir),
                                                                              **PRETRAIN), progress=False)


def test_cli_captioned_pretraining_from_an_exported_promptnet(scene_dir, tmp_path, capsys):
    from conceptkit.cli import main

    common = ["learn", "promptnet", "--pretrain", "--images", str(scene_dir), "--steps", "1", "--batch", "2",
              "--no-validation", "--latents", "mean"]
    assert main([*common, "--out", str(tmp_path / "first")]) == 0
    assert main(["learn", "promptnet", "--export-to", str(tmp_path / "exported"), "--out",
                 str(tmp_path / "first")]) == 0
    out = tmp_path / "captioned"
    assert main([*common, "--captions", "scene", "--init-from", str(tmp_path / "exported"), "--out", str(out)]) == 0
    config = json.loads((out / "training.json").read_text())["config"]
    assert (config["captions"], config["init_from"]) == ("scene", str(tmp_path / "exported"))
    capsys.readouterr()
    assert main(["learn", "promptnet", "--finetune", "--image", str(scene_dir / "000000.png"), "--captions", "scene",
                 "--out", str(tmp_path / "ft")]) == 2
    assert "--captions" in capsys.readouterr().err
