"""Stable Diffusion XL on a tiny random SDXL-architecture fixture (two CLIP encoders over the real CLIP vocabulary,
`text_time` added conditioning): loading, generation through the one loop, and the one-line refusals."""
import json
import shutil

import pytest
import torch

from conceptkit.cli import main
from conceptkit.errors import UserError
from conceptkit.generate.images import generate
from conceptkit.generate.loop import initial_noise, latent_size
from conceptkit.models.loading import load_pipeline
from conceptkit.models.sdxl import encode_prompts, encode_texts, is_sdxl


@pytest.fixture(scope="module")
def xl(sdxl_tiny_dir):
    return load_pipeline(str(sdxl_tiny_dir), device="cpu")


def test_fixture_has_the_sdxl_architecture(xl):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    assert type(xl) is StableDiffusionXLPipeline and is_sdxl(xl)
    assert isinstance(xl.text_encoder_2, CLIPTextModelWithProjection)
    assert xl.unet.config.addition_embed_type == "text_time"
    assert xl.unet.config.cross_attention_dim == xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size
    assert len(xl.tokenizer) == len(xl.tokenizer_2) == 49408
    assert xl.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # real CLIP ids


def test_our_encoding_is_encode_prompts(xl):
    hidden, pooled = encode_texts(xl, ["a photo of a cat"])
    ours, added = encode_prompts(xl, ["a photo of a cat"], None, False, 64, 64)
    assert torch.equal(hidden, ours) and torch.equal(pooled, added["text_embeds"])
    assert added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]


@pytest.mark.parametrize("name, error", [("StableDiffusion3Pipeline", "StableDiffusion3Pipeline"),
                                         ("FluxPipeline", "FluxPipeline"),
                                         ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline")])
def test_unsupported_architectures_are_refused_in_one_line(sdxl_tiny_dir, tmp_path, name, error):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": name}))
    with pytest.raises(UserError, match=f"is a {error} model.*StableDiffusionXLPipeline") as caught:
        load_pipeline(str(folder), device="cpu")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler", "euler-a", "pndm"])
def test_generation_through_the_loop_equals_the_sdxl_pipeline(xl, scheduler):
    """Our loop (any scheduler) gives the latents vanilla StableDiffusionXLPipeline gives from the same noise."""
    from conceptkit.generate.loop import denoise, sampler
    from conceptkit.generate.plain import PromptModel
    from conceptkit.generate.schedulers import make_scheduler

    prompts, seeds = ["a red cat", "a blue dog"], [3, 4]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    schedule = sampler(scheduler, xl, 4)
    start = initial_noise(xl, generators, (32, 32), schedule)
    model = PromptModel(xl, prompts, "blurry", 7.5, size=(64, 64))
    ours = denoise(model, start, schedule, generators=generators)
    original = xl.scheduler
    xl.scheduler = make_scheduler(scheduler, original.config)
    try:
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            g = torch.Generator().manual_seed(seed)  # Euler-ancestral's noise follows the starting noise, as ours
            noise = torch.randn((1, 4, 32, 32), generator=g)
            kwargs = {"eta": 0.0} if scheduler == "ddim" else {}
            with torch.no_grad():
                theirs = xl(prompt, negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5,
                            latents=noise,
                            generator=g, output_type="latent", **kwargs).images
            torch.testing.assert_close(ours[i : i + 1], theirs, atol=1e-4, rtol=1e-4)  # batch 2 vs 1
    finally:
        xl.scheduler = original
    images = generate(xl, prompts, seed=3, steps=4, scheduler=scheduler, progress=False, negative_prompt="blurry")
    assert [im.size for im in images.images] == [(64, 64)] * 2


def test_time_ids_follow_the_requested_size(xl):
    wide = generate(xl, "a cat", width=96, height=64, steps=2, progress=False)
    assert wide.images[0].size == (96, 64)
    assert latent_size(xl, 64, 96) == (32, 48)


def test_cli_generate_on_an_sdxl_folder(sdxl_tiny_dir, tmp_path, capsys):
    main(["generate", "--model", str(sdxl_tiny_dir), "--prompt", "a cat", "--steps", "2", "--num-images", "2",
          "--scheduler", "euler", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert len(list((tmp_path / "out").glob("0*.png"))) == 2 and (tmp_path / "out" / "grid.png").is_file()
