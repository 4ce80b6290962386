"""The bundled shapes-world model: a standard diffusers folder that vanilla diffusers loads and samples."""
import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from conceptkit.models.loading import bundled_model_path
from conceptkit.shapes.captions import vocabulary

BUNDLED = bundled_model_path()


def test_bundled_folder_is_small_enough_to_ship():
    total = sum(f.stat().st_size for f in BUNDLED.rglob("*") if f.is_file())
    assert 0 < total <= 50 * 1024 * 1024


def test_vanilla_diffusers_loads_and_samples_the_bundled_model_exactly_as_a_user_types_it():
    pipe = StableDiffusionPipeline.from_pretrained(BUNDLED)  # no dtype: every component must agree by default
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a large red plain circle in the center, on a white background", num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.std() > 0.01


def test_vanilla_load_lora_weights_takes_a_bundled_lora_with_the_default_dtype():
    pipe = StableDiffusionPipeline.from_pretrained(BUNDLED)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe("a red star", num_inference_steps=3, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images
    before = run()
    pipe.load_lora_weights(str(BUNDLED.parent / "loras" / "red-striped-star.safetensors"), adapter_name="star")
    after = run()
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-3


def test_bundled_tokenizer_has_one_token_per_world_word():
    tokenizer = CLIPTokenizer.from_pretrained(BUNDLED / "tokenizer")
    for word in ("circle", "striped", "navy", "background", "left", "object"):
        assert len(tokenizer(word).input_ids) == 3, word
    assert len(vocabulary()) > 50


def test_model_card_records_recipe_time_and_scores():
    card = json.loads((BUNDLED / "training.json").read_text())
    assert card["unet_steps"] > 0 and card["train_seconds"]["unet"] > 0
    assert "recipe" in card and "hardware" in card
    assert 0.0 <= card["evaluate_base"]["single.shape"] <= 1.0
    assert (BUNDLED / "README.md").is_file()
