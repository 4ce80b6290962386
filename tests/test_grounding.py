"""The base-model recipe: token grounding (TokenCompose's token loss), loss weighting, recipe overrides, tune split."""
import random

import pytest
import torch
from transformers import CLIPTokenizer

from conceptkit.evaluate.prompts import base_prompts, eval_seeds, split_triples
from conceptkit.models.loading import bundled_model_path
from conceptkit.shapes.captions import caption
from conceptkit.shapes.dataset import scenes
from conceptkit.shapes.grounding import (GROUNDED_WORDS, box_coverage, grounding_masks, object_targets, pixel_loss,
                                        token_loss, token_owners)
from conceptkit.errors import UserError
from conceptkit.shapes.train_base import Recipe, loss_weight, parse_overrides
from conceptkit.shapes.world import HELD_OUT_TRIPLES, Obj, Scene

TOKENIZER = CLIPTokenizer.from_pretrained(bundled_model_path() / "tokenizer")


def owners_of(text, scene):
    tokens = TOKENIZER.convert_ids_to_tokens(TOKENIZER(text).input_ids)
    return {t.removesuffix("</w>"): o for t, o in zip(tokens, token_owners(tokens, scene)) if o >= 0}


PAIR = Scene("navy", (Obj("circle", "red", "striped", "left", "medium"), Obj("square", "blue", "plain", "right", "medium")))


@pytest.mark.parametrize("text", [
    "a red striped circle on the left and a blue plain square on the right, on a navy background",
    "navy background with a blue square on the right and a red circle with stripes on the left",
])
def test_each_object_word_is_owned_by_its_object_in_either_order(text):
    owners = owners_of(text, PAIR)
    assert owners["red"] == owners["circle"] == 0 and owners["blue"] == owners["square"] == 1
    assert owners.get("striped", owners.get("stripes")) == 0
    assert "navy" not in owners and "left" not in owners and "background" not in owners


def test_position_words_are_grounded_only_when_asked():
    text = "a blue square on the right and a red circle on the left, on a navy background"
    tokens = TOKENIZER.convert_ids_to_tokens(TOKENIZER(text).input_ids)
    with_position = dict(zip([t.removesuffix("</w>") for t in tokens],
                             token_owners(tokens, PAIR, GROUNDED_WORDS["object+position"])))
    assert with_position["right"] == 1 and with_position["left"] == 0 and with_position["the"] == -1
    assert "left" not in owners_of(text, PAIR)


def test_every_training_caption_grounds_each_shape_word_to_one_object():
    rng = random.Random(0)
    for scene in scenes(200, seed=7):
        text = caption(scene, rng)
        tokens = TOKENIZER.convert_ids_to_tokens(TOKENIZER(text).input_ids)
        owned = token_owners(tokens, scene)
        assert sorted({o for o in owned if o >= 0}) == list(range(len(scene.objects))), text


def test_box_coverage_is_the_box_area_in_cells():
    scene = Scene("gray", (Obj("square", "red", "plain", "left", "large"),), ((1, -2),))
    for res in (16, 8, 4):
        cover = box_coverage(scene, 0, res)
        assert cover.max() <= 1 and cover.min() >= 0
        assert cover.sum() * (64 / res) ** 2 == pytest.approx(30 * 30, rel=1e-5)
        left_half = cover[:, : res // 2].sum() / cover.sum()
        assert left_half > 0.9


def test_token_loss_is_zero_inside_the_mask_and_pulls_attention_towards_it():
    owners = [[-1, 0, -1]]
    masks = grounding_masks(owners, [PAIR], 3, 16)  # (1, 3, 256): the left object's box coverage at 16x16
    core, outside = masks[0, 1] == 1, masks[0, 1] == 0
    perfect = torch.full((1, 2, 256, 3), 1 / 3)
    perfect[0, :, :, 1] = 0
    perfect[0, :, core, 1] = 1.0
    assert token_loss([perfect], {256: masks}).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.zeros(1, 2, 256, 3, requires_grad=True)
    loss = token_loss([logits.softmax(dim=-1)], {256: masks})
    assert loss.item() > 0.5  # uniform attention: ~9 % of it inside the box
    loss.backward()
    grad = logits.grad[0, :, :, 1].mean(0)
    assert (grad[core] < 0).all() and (grad[outside] > 0).all()  # descent raises attention inside the box
    assert token_loss([perfect], {64: masks}).item() == 0.0  # no map at a grounded resolution: no loss


def test_pixel_loss_is_least_when_each_box_reads_its_own_words():
    owners = [[-1, 0, 0, -1, 1, 1, -1]]  # e.g. <bos> red circle and blue square <eot>
    words, boxes = object_targets(owners, [PAIR], 7, 8)
    assert words[0].tolist() == [[0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0]]
    assert boxes[0, 0].view(8, 8)[:, :4].sum() > 0.9 * boxes[0, 0].sum()  # the first object's box is on the left
    own = torch.zeros(1, 1, 64, 7)  # box cells split their attention between their two words, the rest -> <eot>
    for k in (0, 1):
        for t in words[0, k].nonzero().flatten():
            own[0, 0, :, t] = boxes[0, k] / 2
    own[0, 0, :, 6] = 1 - own[0, 0].sum(dim=-1)
    swapped = own[..., [0, 4, 5, 3, 1, 2, 6]]  # each box reads the other object's words
    padding = torch.zeros(1, 1, 64, 7)
    padding[..., 6] = 1.0  # every cell reads only the end-of-text state: the pooled prompt
    loss = {name: pixel_loss([maps], {64: (words, boxes)}).item()
            for name, maps in [("own", own), ("swapped", swapped), ("padding", padding)]}
    assert loss["own"] < loss["padding"] < loss["swapped"]
    assert pixel_loss([own], {256: (words, boxes)}).item() == 0.0  # no map at a grounded resolution: no loss


def test_flat_weighting_trains_every_timestep_and_min_snr_is_diffusers_formula():
    snr = torch.tensor([1e-4, 0.1, 5.0, 100.0])
    assert torch.equal(loss_weight(Recipe(loss_weighting="flat"), snr), torch.ones(4))
    expected = torch.clamp(snr, max=5.0) / (snr + 1)
    assert torch.allclose(loss_weight(Recipe(loss_weighting="min_snr"), snr), expected)
    with pytest.raises(ValueError, match="loss_weighting"):
        loss_weight(Recipe(loss_weighting="nope"), snr)


def test_recipe_overrides_are_typed_and_unknown_fields_refused():
    got = parse_overrides(["lr=3e-4", "grounding_weight=0.5", "bf16=false", "grounding_resolutions=16,8,4",
                           "loss_weighting=min_snr", "batch=32"])
    assert got == {"lr": 3e-4, "grounding_weight": 0.5, "bf16": False, "grounding_resolutions": (16, 8, 4),
                   "loss_weighting": "min_snr", "batch": 32}
    for bad in ["nope=1", "lr", "batch=x"]:
        with pytest.raises(UserError, match="--set"):
            parse_overrides([bad])


def test_an_unknown_recipe_field_is_one_line_and_exit_2(tmp_path, capsys):
    from conceptkit.cli import main

    assert main(["shapes", "train-base", "--run", str(tmp_path / "run"), "--set", "nope=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --set 'nope=1'")
    assert not (tmp_path / "run" / "recipe.json").exists()


def test_the_tune_split_shares_no_prompt_combination_or_seed_with_the_test_split():
    assert not set(split_triples("tune")) & set(HELD_OUT_TRIPLES)
    assert not set(eval_seeds(8, "tune")) & set(eval_seeds(8, "test"))
    tune_single, tune_double = base_prompts(split="tune")
    test_single, test_double = base_prompts(split="test")
    assert not {p.text for p in tune_single + tune_double} & {p.text for p in test_single + test_double}
    assert base_prompts(split="test")[0][0].text == test_single[0].text  # the test split is unchanged by the option
