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
from conceptkit.shapes.concepts import CONCEPTS, concept_folder


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


# ---------------------------------------------------------------------------------------------------------------
# Textual Inversion
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl-concept") / "images"
    shutil.copytree(concept_folder(CONCEPTS[0]), folder)  # four 64x64 renders: the tiny SDXL's native size
    return folder


@pytest.fixture(scope="module")
def xl_ti(sdxl_tiny_dir, concept, tmp_path_factory):
    """A 3-step SDXL Textual Inversion run: (its output folder, the pipeline it returned)."""
    from conceptkit.learn.textual_inversion import TIConfig, learn_textual_inversion

    pipe = load_pipeline(str(sdxl_tiny_dir), device="cpu")
    out = tmp_path_factory.mktemp("xl-ti") / "run"
    cfg = TIConfig(token="<xcat>", init_word="cat", steps=3, batch=2, lr=5e-2, validation_prompts=(), seed=0)
    result = learn_textual_inversion(pipe, concept, out, cfg)
    return out, pipe, result


def vanilla_prompt_embeddings(folder, prompt, load):
    """encode_prompt of a plain StableDiffusionXLPipeline after `load(pipe)`."""
    from diffusers import StableDiffusionXLPipeline

    vanilla = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    load(vanilla)
    with torch.no_grad():
        embeds, _, pooled, _ = vanilla.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    return embeds, pooled


def test_ti_trains_a_vector_set_for_each_encoder_and_writes_both_layouts(xl_ti, sdxl_tiny_dir):
    from safetensors.torch import load_file

    from conceptkit.models.embeddings import read_embedding

    out, pipe, result = xl_ti
    fresh = load_pipeline(str(sdxl_tiny_dir), device="cpu")
    cat = fresh.tokenizer("cat", add_special_tokens=False).input_ids[0]
    first, second = result.embedding.vectors, result.embedding.vectors_2
    assert first.shape == (1, 32) and second.shape == (1, 32)
    # both moved away from the init word's rows: trained together
    assert not torch.allclose(first[0], fresh.text_encoder.get_input_embeddings().weight[cat])
    assert not torch.allclose(second[0], fresh.text_encoder_2.get_input_embeddings().weight[cat])
    community = load_file(out / "xcat.safetensors")
    assert set(community) == {"clip_l", "clip_g"}
    assert torch.equal(community["clip_l"], first) and torch.equal(community["clip_g"], second)
    assert set(load_file(out / "learned_embeds.safetensors")) == {"<xcat>"}
    for source, token, layout in ((out, None, "diffusers_sdxl"), (out / "xcat.safetensors", "<xcat>", "sdxl")):
        back = read_embedding(source, token)
        assert (back.token, back.layout) == ("<xcat>", layout)
        assert torch.equal(back.vectors, first) and torch.equal(back.vectors_2, second)
    # every base weight is unchanged
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(fresh, name).state_dict()
        assert all(torch.equal(ours[k][: len(theirs[k])], theirs[k]) for k in theirs)


def test_vanilla_load_textual_inversion_reproduces_our_training_embeddings(xl_ti, sdxl_tiny_dir):
    """diffusers' documented SDXL recipe (load_textual_inversion once per encoder, from the community file) gives
    exactly the prompt embeddings the trainer's spliced encoders gave."""
    from safetensors.torch import load_file

    from conceptkit.learn.textual_inversion import TIConfig, condition, spliced_all, training_tokenizer
    from conceptkit.models.sdxl import encoders, tokenize

    out, _, result = xl_ti
    prompt = "a photo of <xcat> on the grass"
    state = load_file(out / "xcat.safetensors")

    def load(vanilla):
        vanilla.load_textual_inversion(state["clip_g"], token="<xcat>", text_encoder=vanilla.text_encoder_2,
                                       tokenizer=vanilla.tokenizer_2)
        vanilla.load_textual_inversion(state["clip_l"], token="<xcat>", text_encoder=vanilla.text_encoder,
                                       tokenizer=vanilla.tokenizer)

    theirs, theirs_pooled = vanilla_prompt_embeddings(sdxl_tiny_dir, prompt, load)
    fresh = load_pipeline(str(sdxl_tiny_dir), device="cpu")
    toks = [training_tokenizer(tok, TIConfig(token="<xcat>")) for tok, _ in encoders(fresh)]
    ids = [tokenize(tok, [prompt], "cpu") for tok in toks]
    with spliced_all(fresh, [result.embedding.vectors, result.embedding.vectors_2], [49408, 49408]), \
            torch.no_grad():
        ours, added = condition(fresh, ids, torch.tensor([0]), (32, 32))
    assert torch.equal(ours, theirs) and torch.equal(added["text_embeds"], theirs_pooled)
    # and what `generate --embedding` loads (our add_embedding) encodes the same
    loaded = load_pipeline(str(sdxl_tiny_dir), device="cpu")
    from conceptkit.models.embeddings import add_embedding, read_embedding

    add_embedding(loaded, read_embedding(out))
    embeds, added = encode_prompts(loaded, [prompt], None, False, 64, 64)
    assert torch.equal(embeds, theirs) and torch.equal(added["text_embeds"], theirs_pooled)


def test_one_encoder_embeddings_are_refused_on_sdxl_in_one_line(xl, tmp_path):
    from conceptkit.models.embeddings import add_embedding, read_embedding, save_embedding

    save_embedding(tmp_path / "sd15.safetensors", "<old>", torch.zeros(1, 768))
    with pytest.raises(UserError, match="one text encoder .* this SDXL model has two") as caught:
        add_embedding(xl, read_embedding(tmp_path / "sd15.safetensors"))
    assert "\n" not in str(caught.value)
    save_embedding(tmp_path / "wide.safetensors", "<w>", (torch.zeros(1, 768), torch.zeros(1, 1280)), fmt="sdxl")
    with pytest.raises(UserError, match="size 768 but this model's text encoder 1 uses 32"):
        add_embedding(xl, read_embedding(tmp_path / "wide.safetensors"))


def test_cli_learn_ti_then_generate_with_the_community_file(sdxl_tiny_dir, concept, tmp_path, capsys):
    main(["learn", "ti", "--model", str(sdxl_tiny_dir), "--images", str(concept), "--token", "<xs>",
          "--init-word", "cat", "--steps", "2", "--batch", "1", "--no-validation", "--device", "cpu",
          "--out", str(tmp_path / "ti")])
    assert (tmp_path / "ti" / "xs.safetensors").is_file() and (tmp_path / "ti" / "learned_embeds_2.safetensors").is_file()
    main(["generate", "--model", str(sdxl_tiny_dir), "--embedding", f"{tmp_path / 'ti' / 'xs.safetensors'}:<xs>",
          "--prompt", "a <xs> on a beach", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "gen")])
    assert (tmp_path / "gen" / "grid.png").is_file()
    assert "loaded <xs> (1 vector(s), sdxl layout)" in capsys.readouterr().err
