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
    assert main(["generate", "--model", str(sdxl_tiny_dir), "--prompt", "a cat", "--steps", "2", "--num-images", "2",
          "--scheduler", "euler", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("0*.png"))) == 2 and (tmp_path / "out" / "grid.png").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Single-file (original SGM layout) checkpoints with --config
# ---------------------------------------------------------------------------------------------------------------

XL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
XL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
               "conditioner.embedders.1.model.")


def test_sdxl_single_file_has_the_original_layout(sdxl_tiny_single_file):
    from safetensors.torch import load_file

    weights = load_file(str(sdxl_tiny_single_file))
    assert all(key.startswith(XL_PREFIXES) for key in weights)
    assert all(any(key.startswith(prefix) for key in weights) for prefix in XL_PREFIXES)
    for key in ("model.diffusion_model.label_emb.0.0.weight",  # the text_time embedding
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",  # depth 2
                "model.diffusion_model.output_blocks.2.2.conv.weight",  # upsampler after the attention
                "first_stage_model.decoder.up.1.upsample.conv.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.4.self_attn.q_proj.weight",
                "conditioner.embedders.1.model.token_embedding.weight",
                "conditioner.embedders.1.model.ln_final.weight",
                "conditioner.embedders.1.model.transformer.resblocks.4.mlp.c_proj.bias"):
        assert key in weights, key
    assert weights["conditioner.embedders.1.model.positional_embedding"].shape == (77, 48)
    assert weights["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert weights["conditioner.embedders.1.model.text_projection"].shape == (48, 48)
    diffusers_names = ("down_blocks", "resnets", "mid_block", "add_embedding", "time_embedding", "conv_norm_out")
    assert not any(name in key for key in weights for name in diffusers_names)
    open_clip_keys = [key for key in weights if key.startswith("conditioner.embedders.1.")]
    transformers_names = ("text_model", "self_attn", "q_proj", "layer_norm", "fc1", "final_layer_norm")
    assert not any(name in key for key in open_clip_keys for name in transformers_names)


def test_sdxl_single_file_loads_the_folders_weights(sdxl_tiny_single_file, sdxl_tiny_wide_dir, monkeypatch):
    import socket

    from diffusers import StableDiffusionXLPipeline

    def no_network(*args, **kwargs):
        raise AssertionError("loading tried the network")

    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    folder = load_pipeline(str(sdxl_tiny_wide_dir), device="cpu")
    single = load_pipeline(str(sdxl_tiny_single_file), config=str(sdxl_tiny_wide_dir), device="cpu")
    assert type(single) is StableDiffusionXLPipeline
    assert (folder.text_encoder.config.hidden_size, folder.text_encoder_2.config.hidden_size) == (32, 48)
    for name in XL_COMPONENTS:  # float32 written, float32 read: no dtype round trip, so bit-equal
        ours, theirs = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, tensor in theirs.items():
            assert torch.equal(ours[key], tensor), f"{name}.{key}"


def test_cli_generate_from_the_sdxl_single_file_equals_the_folder(sdxl_tiny_single_file, sdxl_tiny_wide_dir,
                                                                   tmp_path):
    import numpy as np
    from PIL import Image

    def run(out, *model):
        assert main(["generate", *model, "--prompt", "a red cat", "--steps", "2", "--seed", "5", "--scheduler",
                     "euler", "--device", "cpu", "--out", str(out)]) == 0
        [image] = out.glob("000-*.png")
        return np.asarray(Image.open(image))

    from_file = run(tmp_path / "file", "--model", str(sdxl_tiny_single_file), "--config", str(sdxl_tiny_wide_dir))
    from_folder = run(tmp_path / "folder", "--model", str(sdxl_tiny_wide_dir))
    assert from_file.shape == (64, 64, 3) and from_file.std() > 0
    # The weights are bit-equal (test above), but CPU kernels round differently for weights left at unaligned
    # addresses in the memory-mapped file (copying every weight into fresh memory makes the two runs bit-equal):
    # last-bit float differences, which may move a pixel by one level. Wrong weights (one encoder's q and k
    # swapped) move pixels by more.
    difference = np.abs(from_file.astype(int) - from_folder.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.001


def test_sdxl_single_file_without_config_asks_for_it_in_one_line(sdxl_tiny_single_file, capsys):
    assert main(["generate", "--model", str(sdxl_tiny_single_file), "--prompt", "a cat", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "single-file checkpoint: also pass --config" in error


def test_sdxl_single_file_lacking_a_weight_is_refused_in_one_line(sdxl_tiny_single_file, sdxl_tiny_wide_dir,
                                                                   tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(sdxl_tiny_single_file))
    del weights["conditioner.embedders.1.model.text_projection"]
    save_file(weights, str(tmp_path / "partial.safetensors"))
    with pytest.raises(UserError, match="lacks 1 weight.*text_encoder_2.text_projection.weight") as caught:
        load_pipeline(str(tmp_path / "partial.safetensors"), config=str(sdxl_tiny_wide_dir), device="cpu")
    assert "\n" not in str(caught.value)


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
    assert main(["learn", "ti", "--model", str(sdxl_tiny_dir), "--images", str(concept), "--token", "<xs>",
                 "--init-word", "cat", "--steps", "2", "--batch", "1", "--no-validation", "--device", "cpu",
                 "--out", str(tmp_path / "ti")]) == 0
    assert (tmp_path / "ti" / "xs.safetensors").is_file() and (tmp_path / "ti" / "learned_embeds_2.safetensors").is_file()
    assert main(["generate", "--model", str(sdxl_tiny_dir), "--embedding", f"{tmp_path / 'ti' / 'xs.safetensors'}:<xs>",
          "--prompt", "a <xs> on a beach", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "grid.png").is_file()
    assert "loaded <xs> (1 vector(s), sdxl layout)" in capsys.readouterr().err



def test_a1111_pt_format_is_refused_on_sdxl_in_one_line(sdxl_tiny_dir, concept, tmp_path, capsys):
    assert main(["learn", "ti", "--model", str(sdxl_tiny_dir), "--images", str(concept), "--token", "<xs>",
                 "--steps", "2", "--batch", "1", "--no-validation", "--device", "cpu", "--format", "a1111",
                 "--out", str(tmp_path / "ti")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --format a1111") and "clip_g" in err[-1]
    assert not (tmp_path / "ti").exists() or not any((tmp_path / "ti").glob("*.safetensors"))

# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------

def xl_outputs(pipe, prompt="a photo of zwx star"):
    """(prompt embeddings, pooled, UNet output) for fixed inputs: what a LoRA on the encoders / UNet changes."""
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        eps = pipe.unet(latents, torch.tensor(500), encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    return embeds, pooled, eps


def same(a, b, atol=0.0):
    return all(torch.allclose(x, y, atol=atol, rtol=0) for x, y in zip(a, b))


def random_xl_lora(folder, out, seed, trigger):
    """A random SDXL LoRA on the UNet and both text encoders (rank 4, alpha 8), saved to `out`; the outputs of the
    model it was saved from, without and with the adapter."""
    from conceptkit.learn.lora import ADAPTER, add_training_adapters
    from conceptkit.learn.lora_config import LoRAConfig
    from conceptkit.models.lora import save_lora

    src = load_pipeline(str(folder), device="cpu")
    base = xl_outputs(src)
    add_training_adapters(src, LoRAConfig(rank=4, alpha=8.0), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (src.unet, src.text_encoder, src.text_encoder_2):
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    want = xl_outputs(src)
    path = save_lora(out, src.unet, src.text_encoder, text_encoder_2=src.text_encoder_2, adapter_name=ADAPTER,
                     metadata={"trigger": trigger, "class_word": "star"})
    return path, base, want


@pytest.fixture(scope="module")
def xl_lora(sdxl_tiny_dir, tmp_path_factory):
    return random_xl_lora(sdxl_tiny_dir, tmp_path_factory.mktemp("xl-lora") / "zwx", 0, "zwx")


def test_our_sdxl_lora_file_loads_in_vanilla_diffusers_like_ours(xl_lora, sdxl_tiny_dir):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from conceptkit.models.lora import load_lora

    path, base, want = xl_lora
    keys = load_file(path)
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    plain = StableDiffusionXLPipeline.from_pretrained(str(sdxl_tiny_dir), local_files_only=True)
    plain.load_lora_weights(str(path.parent))
    theirs = xl_outputs(plain)
    ours_pipe = load_pipeline(str(sdxl_tiny_dir), device="cpu")
    info = load_lora(ours_pipe, path, "zwx")
    assert same(xl_outputs(ours_pipe), theirs)
    assert same(theirs, want, atol=1e-5)  # alpha 8 / rank 4 round-trips
    for i in range(3):  # the LoRA changes the hidden states, the pooled embedding and the UNet
        assert not torch.allclose(theirs[i], base[i], atol=1e-3)
    assert info.has_text_encoder and (info.trigger, info.rank, info.alpha) == ("zwx", 4, 8.0)


def to_kohya_sdxl(state, unet):
    """diffusers-layout SDXL LoRA -> kohya's (lora_unet_ with the UNet's original input_blocks/… names,
    lora_te1_/lora_te2_, lora_down/lora_up, .alpha)."""
    from conceptkit.models.fixtures import unet_key_to_ldm

    up_with_attention = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    out = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora.", 1) if ".lora." in rest else rest.rsplit(".lora_linear_layer.", 1)
        if component == "unet":
            module = unet_key_to_ldm(module + ".weight", unet.config.layers_per_block,
                                     up_with_attention).removesuffix(".weight")
        else:  # transformers 5 flattens CLIPTextModel (no text_model.), not CLIPTextModelWithProjection
            module = module.removeprefix("text_model.")
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_text_model_",
                  "text_encoder_2": "lora_te2_text_model_"}[component]
        name = prefix + module.replace(".", "_")
        out[f"{name}.{'lora_down' if kind.startswith('down') else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(8.0)
    return out


def test_kohya_sdxl_lora_with_te1_te2_keys_loads_like_the_diffusers_file(xl_lora, sdxl_tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from conceptkit.models.lora import check_lora_fits, load_lora

    path, _, want = xl_lora
    pipe = load_pipeline(str(sdxl_tiny_dir), device="cpu")
    kohya = to_kohya_sdxl(load_file(path), pipe.unet)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k.lora_up.weight" in kohya
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    assert "lora_te2_text_model_encoder_layers_4_self_attn_out_proj.lora_down.weight" in kohya
    save_file(kohya, tmp_path / "zwx_kohya.safetensors")
    assert sorted(check_lora_fits(pipe, tmp_path / "zwx_kohya.safetensors")) == sorted(check_lora_fits(pipe, path))
    info = load_lora(pipe, tmp_path / "zwx_kohya.safetensors", "kohya")
    assert info.has_text_encoder and (info.rank, info.alpha) == (4, 8.0)
    assert same(xl_outputs(pipe), want, atol=1e-5)


def test_loras_of_the_other_architecture_are_refused_in_one_line(xl_lora, xl, sd_tiny_dir, tmp_path):
    from conceptkit.models.lora import load_lora

    path, _, _ = xl_lora
    sd = load_pipeline(str(sd_tiny_dir), device="cpu")
    with pytest.raises(UserError, match="does not fit this model") as caught:
        load_lora(sd, path, "xl")
    assert "\n" not in str(caught.value)
    from conceptkit.learn.lora import add_training_adapters, ADAPTER
    from conceptkit.learn.lora_config import LoRAConfig
    from conceptkit.models.lora import save_lora

    add_training_adapters(sd, LoRAConfig(rank=2), 0)
    sd_path = save_lora(tmp_path / "sd", sd.unet, sd.text_encoder, adapter_name=ADAPTER)
    with pytest.raises(UserError, match="does not fit this model: .* expects input 768 .*model.s has 32") as caught:
        load_lora(xl, sd_path, "sd")
    assert "\n" not in str(caught.value)


def test_cli_learn_lora_trains_both_encoders_and_generates(sdxl_tiny_dir, concept, tmp_path, capsys):
    from safetensors.torch import load_file

    assert main(["learn", "lora", "--model", str(sdxl_tiny_dir), "--images", str(concept), "--prompt", "a photo of {}",
          "--trigger", "zwx", "--class-word", "star", "--steps", "2", "--batch", "1", "--rank", "2",
          "--no-validation", "--device", "cpu", "--out", str(tmp_path / "lora")]) == 0
    state = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    trained = {k.split(".")[0] for k, v in state.items() if k.endswith(".up.weight") and v.abs().max() > 0}
    assert trained == {"unet", "text_encoder", "text_encoder_2"}  # every component's B moved from zero
    assert main(["generate", "--model", str(sdxl_tiny_dir), "--lora", str(tmp_path / "lora"), "--prompt", "a zwx star",
          "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "grid.png").is_file()


# ---------------------------------------------------------------------------------------------------------------
# CLoRA, ProFusion
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_loras(xl_lora, sdxl_tiny_dir, tmp_path_factory):
    other = random_xl_lora(sdxl_tiny_dir, tmp_path_factory.mktemp("xl-lora-2") / "qxv", 1, "qxv")
    return xl_lora[0], other[0]


def test_clora_on_sdxl_captures_the_deepest_transformer_blocks_and_blends_with_masks(two_loras, sdxl_tiny_dir):
    from conceptkit.compose.config import CLoRAConfig
    from conceptkit.compose.run import LoraSpec, compose

    pipe = load_pipeline(str(sdxl_tiny_dir), device="cpu")
    out = compose(pipe, "a {a} and a {b} on the grass", [LoraSpec("a", two_loras[0]), LoraSpec("b", two_loras[1])],
                  methods=["clora", "merge"], seeds=[0], cfg=CLoRAConfig(steps=4, max_iter_to_alter=2),
                  save_maps=True)
    trace = out.traces[("clora", 0)]
    maps, masks = trace.maps[0], trace.masks[0]
    # the tiny SDXL's cross-attention lives at latent/2 (16x16 of 32x32): its deepest level, as SDXL's 32x32 at 1024
    assert maps.shape == (3, 16, 16, 77) and masks.shape == (3, 32, 32)
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 16, 16), atol=1e-4, rtol=0)
    assert trace.losses and all(torch.isfinite(torch.tensor(trace.losses)))
    clora, merge = (torch.tensor(list(out.images[m][0].getdata())).float() for m in ("clora", "merge"))
    assert out.images["clora"][0].size == (64, 64) and (clora - merge).abs().mean() > 1


@pytest.mark.parametrize("cond_only", [False, True])
def test_sdxl_batched_branches_equal_the_sequential_ones(two_loras, sdxl_tiny_dir, cond_only):
    """One batched UNet call with per-row adapters on the UNet and both encoders = one call per branch with PEFT's
    adapter switching (the official structure), pooled embeddings and time ids included."""
    from conceptkit.compose.attention import AttentionStore, capturing
    from conceptkit.compose.branches import BranchModel, Branches, encode_branches
    from conceptkit.compose.config import CLoRAConfig
    from conceptkit.models.lora import load_lora

    pipe = load_pipeline(str(sdxl_tiny_dir), device="cpu")
    load_lora(pipe, two_loras[0], "a")
    load_lora(pipe, two_loras[1], "b")
    branches = Branches(["a star and a star", "a zwx star and a star", "a star and a qxv star"], [""] * 3,
                        [{}, {"a": 1.0}, {"b": 1.0}])
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for execution in ("batched", "sequential"):
        cfg = CLoRAConfig(execution=execution)
        store = AttentionStore((16, 16))
        embeddings = encode_branches(pipe, branches, cfg, None)
        with capturing(pipe.unet, store), torch.no_grad():
            results.append(BranchModel(pipe, branches, embeddings, cfg, store)(z, torch.tensor(500), cond_only))
        results[-1] = (embeddings, results[-1])
    (e_b, (u_b, c_b, m_b)), (e_s, (u_s, c_s, m_s)) = results
    torch.testing.assert_close(e_b[0], e_s[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e_b[1], e_s[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(e_b[1][3], e_b[1][4], atol=1e-3)  # each branch's own text-encoder adapters
    torch.testing.assert_close(c_b, c_s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m_b, m_s, atol=1e-5, rtol=1e-4)
    if not cond_only:
        torch.testing.assert_close(u_b, u_s, atol=1e-4, rtol=1e-4)


def test_cli_compose_clora_merge_on_sdxl(two_loras, sdxl_tiny_dir, tmp_path, capsys):
    assert main(["compose", "--model", str(sdxl_tiny_dir), "--prompt", "a {a} and a {b}", "--lora", f"a={two_loras[0]}",
          "--lora", f"b={two_loras[1]}", "--method", "clora,merge", "--steps", "2", "--device", "cpu",
          "--out", str(tmp_path / "compose")]) == 0
    summary = json.loads((tmp_path / "compose" / "compose.json").read_text())
    assert set(summary["methods"]) == {"clora", "merge"}
    assert summary["branch_prompts"][1].startswith("a zwx star")
    assert (tmp_path / "compose" / "clora" / "s0.png").is_file()


def test_profusion_on_sdxl_is_refused_in_one_line(sdxl_tiny_dir, tmp_path, capsys):
    code = main(["generate", "--model", str(sdxl_tiny_dir), "--prompt", "a photo of S*", "--promptnet",
                 str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "ProFusion (PromptNet) is for Stable Diffusion 1.x/2.x models only" in err
