"""Official ProFusion PromptNets (drboog/ProFusion) converted to conceptkit's, and strict PromptNet loading.

The official checkpoints are built here from the official module tree as its constructor lays it out (its names,
its kernel rule max(2^(blocks-1), 8) halved after every block but the last, its residual heads) for the tiny SD
fixture and the bundled toy model, and its forward is written out from the official code with those tensors: the
converted PromptNet must give the same word."""
import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conceptkit.cli import main
from conceptkit.errors import UserError
from conceptkit.models.loading import load_pipeline
from conceptkit.profusion.image_encoders import LatentPatchEncoder
from conceptkit.profusion.official import convert_official, find_official
from conceptkit.profusion.promptnet import PromptNet
from conceptkit.profusion.saved import load_promptnet, save_promptnet

ENCODER_HALF = ("conv_in", "time_embedding", "down_blocks", "mid_block")
REGION_CHANNELS = 16  # the official region_proj_channel (128 on SD 2), small here
IMAGE_DIM = 1024  # the official vision_embedding takes 1024 (use_clip_vision_embeds=False) or 1280 tokens


@pytest.fixture(scope="module")
def sd(sd_tiny_dir):
    return load_pipeline(str(sd_tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy", device="cpu")


def official_kernels(blocks: int) -> list[int]:
    """The official constructor's projection kernels: first, after each down block, after the mid block."""
    size = max(2 ** (blocks - 1), 8)
    kernels = [size]
    for i in range(blocks):
        if i != blocks - 1:
            size //= 2
        kernels.append(size)
    return kernels + [size]


def official_state(unet, text_dim: int, seed: int = 0, region_kernel: int | None = None) -> dict:
    """An official PromptNetModel state dict for `unet`'s encoder half: its names and shapes, random values (the
    encoder half perturbed, as training would leave it), residual heads included."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    channels = list(unet.config.block_out_channels)
    blocks, layers = len(channels), unet.config.layers_per_block
    state = {f"{part}.{k}": v.detach().clone() + rand(*v.shape) * 0.05
             for part in ENCODER_HALF for k, v in getattr(unet, part).state_dict().items()}
    c0, latent = channels[0], unet.config.in_channels
    state.update({"promptnet_cond_embedding.conv_in.weight": rand(c0, latent, 3, 3),
                  "promptnet_cond_embedding.conv_in.bias": rand(c0),
                  "promptnet_cond_embedding.conv_out.weight": rand(c0, c0, 3, 3),
                  "promptnet_cond_embedding.conv_out.bias": rand(c0),
                  "vision_embedding.weight": rand(unet.config.cross_attention_dim, IMAGE_DIM) * 0.1,
                  "vision_embedding.bias": rand(unet.config.cross_attention_dim)})
    kernels = official_kernels(blocks)
    inputs = [c0] + channels + [channels[-1]]
    names = ["first_prompt_projection"] + [f"down_prompt_projections.{i}" for i in range(blocks)] + \
            ["mid_prompt_projection"]
    for name, c, k in zip(names, inputs, kernels):
        state[f"{name}.weight"] = rand(REGION_CHANNELS, c, k, k)
        state[f"{name}.bias"] = rand(REGION_CHANNELS)
    # residual heads (use_res=True): conv_in's output, every resnet, every downsampler; then the mid block's
    heads = [c0] + [c for i, c in enumerate(channels) for _ in range(layers + (i < blocks - 1))]
    for j, c in enumerate(heads):
        state[f"residual_projections.{j}.weight"] = rand(c, c, 1, 1)
        state[f"residual_projections.{j}.bias"] = rand(c)
        state[f"residual_projections_2.{j}.weight"] = rand(c, c, 1, 1)
    state.update({"mid_residual_projection.weight": rand(channels[-1], channels[-1], 1, 1),
                  "mid_residual_projection.bias": rand(channels[-1]),
                  "mid_residual_projection_2.weight": rand(channels[-1], channels[-1], 1, 1)})
    grid = unet.config.sample_size // kernels[0]
    r = region_kernel or grid
    state["region_prompt_output.weight"] = rand(text_dim, REGION_CHANNELS * len(names), r, r) * 0.1
    state["region_prompt_output.bias"] = rand(text_dim)
    return state


def official_config(unet, region_kernel: int) -> dict:
    """promptnet/config.json as the official PromptNetModel.from_pretrained(unet folder, ...) records it."""
    keys = ("sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
            "mid_block_type", "block_out_channels", "layers_per_block", "downsample_padding", "act_fn",
            "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "use_linear_projection")
    config = {k: unet.config[k] for k in keys}
    config.update({"_class_name": "PromptNetModel", "_diffusers_version": "0.15.0.dev0",
                   "region_kernel_size": region_kernel, "region_proj_channel": REGION_CHANNELS,
                   "prompt_channel": 1024, "use_clip_vision_embeds": False, "use_res": True, "with_noise": True,
                   "res_block_out_channels": list(unet.config.block_out_channels)})
    return json.loads(json.dumps(config))


@torch.no_grad()
def official_forward(state, unet, x_ref, t, tokens, x_t):
    """PromptNetModel.forward (the official code) with the official tensors: conv_in(sample) + cond embedding of
    promptnet_cond, vision_embedding context, one projection per feature map, region_prompt_output, (B, words, d)."""
    net = copy.deepcopy(unet).double()
    for part in ENCODER_HALF:
        getattr(net, part).load_state_dict({k[len(part) + 1:]: v.double() for k, v in state.items()
                                            if k.startswith(part + ".")})
    w = {k: v.double() for k, v in state.items()}

    def conv(x, name, padding=0):
        k = w[f"{name}.weight"].shape[-1] if not padding else 1
        return F.conv2d(x, w[f"{name}.weight"], w[f"{name}.bias"], stride=k, padding=padding)

    emb = net.time_embedding(net.time_proj(t.expand(x_ref.shape[0])).double())
    cond = conv(F.silu(conv(x_t, "promptnet_cond_embedding.conv_in", 1)), "promptnet_cond_embedding.conv_out", 1)
    h = net.conv_in(x_ref) + cond
    context = F.linear(tokens, w["vision_embedding.weight"], w["vision_embedding.bias"])
    projections = [conv(h, "first_prompt_projection")]
    for i, block in enumerate(net.down_blocks):
        if getattr(block, "has_cross_attention", False):  # as the official forward asks
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, _ = block(hidden_states=h, temb=emb)
        projections.append(conv(h, f"down_prompt_projections.{i}"))
    h = net.mid_block(h, emb, encoder_hidden_states=context)
    projections.append(conv(h, "mid_prompt_projection"))
    region = conv(torch.cat(projections, 1), "region_prompt_output")
    return region.reshape(region.shape[0], region.shape[1], -1).permute(0, 2, 1)


def inputs(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    size, c = unet.config.sample_size, unet.config.in_channels
    return (torch.randn(2, c, size, size, generator=g, dtype=torch.float64), torch.tensor([321]),
            torch.randn(2, 5, IMAGE_DIM, generator=g, dtype=torch.float64),
            torch.randn(2, c, size, size, generator=g, dtype=torch.float64))


def write_clip(folder, width=IMAGE_DIM):
    """A tiny transformers CLIPModel (the pipeline's openclip/) whose vision tower gives `width`-d tokens."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=99),
        vision_config=dict(hidden_size=width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=16),
        projection_dim=16)).save_pretrained(folder)
    return folder


def write_official(root, unet, text_dim, *, fmt="bin", clip=True, seed=0, state=None):
    """The folder train.py's pipeline.save_pretrained writes (the parts conceptkit reads)."""
    state = state if state is not None else official_state(unet, text_dim, seed)
    region_kernel = state["region_prompt_output.weight"].shape[-1]
    (root / "promptnet").mkdir(parents=True)
    index = {"_class_name": "StableDiffusionPromptNetPipeline", "promptnet": ["diffusers", "PromptNetModel"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if clip:
        index["openclip"] = ["transformers", "CLIPModel"]
        write_clip(root / "openclip")
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "promptnet" / "config.json").write_text(json.dumps(official_config(unet, region_kernel)))
    if fmt == "bin":
        torch.save(state, root / "promptnet" / "diffusion_pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()},
                  root / "promptnet" / "diffusion_pytorch_model.safetensors")
    return root


def text_dim(pipe):
    return pipe.text_encoder.get_input_embeddings().weight.shape[1]


# ------------------------------------------------------------------------------------ the conversion

@pytest.mark.parametrize("which", ["sd", "toy"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_converted_official_promptnet_gives_the_official_word(which, fmt, sd, toy, tmp_path):
    """The SD fixture has 4 blocks (the official kernels are the mid-block grid's); the toy has 3, where the
    official first kernel 8 makes a 2x2 grid instead of conceptkit's default 4x4."""
    pipe = {"sd": sd, "toy": toy}[which]
    state = official_state(pipe.unet, text_dim(pipe))
    folder = write_official(tmp_path / "official", pipe.unet, text_dim(pipe), fmt=fmt, clip=False, state=state)
    converted = convert_official(find_official(folder))
    net = converted.promptnet.double().eval()
    assert net.grid == pipe.unet.config.sample_size // official_kernels(len(pipe.unet.config.block_out_channels))[0]
    x_ref, t, tokens, x_t = inputs(pipe.unet)
    with torch.no_grad():
        ours = net(x_ref, t, tokens, x_t)
    want = official_forward(state, pipe.unet, x_ref, t, tokens, x_t)
    assert ours.shape == want.shape == (2, 1, text_dim(pipe))
    assert (ours - want).abs().max() < 1e-9 * max(1.0, want.abs().max().item())
    # every official tensor but the residual heads is in it
    kept = {k for k in state if "residual_projection" not in k}
    assert len(net.state_dict()) == len(kept)
    assert converted.meta["pad_prompt"] is False and converted.meta["latents"] == "sample"


def test_the_pipeline_folder_its_promptnet_folder_and_its_weights_file_are_found(sd, tmp_path):
    folder = write_official(tmp_path / "official", sd.unet, text_dim(sd))
    weights = folder / "promptnet" / "diffusion_pytorch_model.bin"
    for given in (folder, folder / "promptnet", weights):
        source = find_official(given)
        assert source.weights == weights and source.config == folder / "promptnet" / "config.json"
        assert source.image_encoder == folder / "openclip"
    ours = save_promptnet(tmp_path / "ours", PromptNet.from_unet(sd.unet, 18, text_dim(sd)), LatentPatchEncoder(), {})
    assert find_official(ours) is None and find_official(tmp_path / "nothing") is None


def official_error(pipe, tmp_path, edit, **kw):
    state = official_state(pipe.unet, text_dim(pipe), **kw)
    edit(state)
    folder = write_official(tmp_path / "official", pipe.unet, text_dim(pipe), clip=False, state=state)
    with pytest.raises(UserError) as e:
        convert_official(find_official(folder))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_missing_official_tensor_is_named_in_one_line(sd, tmp_path):
    message = official_error(sd, tmp_path, lambda s: s.pop("down_prompt_projections.1.weight"))
    assert re.search(r"missing 1 tensor\(s\): down_prompt_projections\.1\.weight", message), message


def test_an_unexpected_official_tensor_is_named_in_one_line(sd, tmp_path):
    def add(state):
        state["class_embedding.linear_1.weight"] = torch.zeros(4, 4)

    message = official_error(sd, tmp_path, add)
    assert "unexpected 1 tensor(s): class_embedding.linear_1.weight" in message, message


def test_a_misshapen_official_tensor_is_named_in_one_line(sd, tmp_path):
    def widen(state):
        state["promptnet_cond_embedding.conv_out.bias"] = torch.zeros(7)

    message = official_error(sd, tmp_path, widen)
    assert "promptnet_cond_embedding.conv_out.bias has shape (7,)" in message, message


def test_an_official_promptnet_making_several_words_is_refused(toy, tmp_path):
    message = official_error(toy, tmp_path, lambda s: None, region_kernel=1)
    assert "more than one word" in message, message


def test_a_weights_file_alone_takes_the_base_models_unet(sd, tmp_path):
    state = official_state(sd.unet, text_dim(sd))
    torch.save(state, tmp_path / "promptnet.bin")
    source = find_official(tmp_path / "promptnet.bin")
    assert source.config is None
    with pytest.raises(UserError, match="pass --model"):
        convert_official(source)
    net = convert_official(source, unet_config=sd.unet.config).promptnet.double()
    x_ref, t, tokens, x_t = inputs(sd.unet)
    with torch.no_grad():
        ours = net(x_ref, t, tokens, x_t)
    assert (ours - official_forward(state, sd.unet, x_ref, t, tokens, x_t)).abs().max() < 1e-9


# ------------------------------------------------------------------------------------ strict loading of our folders

def damaged_folder(pipe, tmp_path, edit):
    folder = save_promptnet(tmp_path / "pn", PromptNet.from_unet(pipe.unet, 18, text_dim(pipe)),
                            LatentPatchEncoder(), {})
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    edit(state)
    save_file(state, weights)
    return folder


@pytest.mark.parametrize("edit, pattern", [
    (lambda s: s.pop("projections.1.weight"), r"missing 1 tensor\(s\): projections\.1\.weight"),
    (lambda s: s.update({"residual_projections.0.weight": torch.zeros(1)}),
     r"unexpected 1 tensor\(s\): residual_projections\.0\.weight"),
    (lambda s: s.update({"to_word.bias": torch.zeros(3)}), r"to_word\.bias has shape \(3,\)"),
])
def test_a_promptnet_folder_whose_weights_do_not_fit_is_refused_in_one_line(sd, tmp_path, edit, pattern, capsys):
    """Before, a missing tensor loaded as its random initialisation and an extra one was ignored."""
    folder = damaged_folder(sd, tmp_path, edit)
    with pytest.raises(UserError) as e:
        load_promptnet(folder, sd)
    assert "\n" not in str(e.value) and re.search(pattern, str(e.value)), str(e.value)


# ------------------------------------------------------------------------------------ the command line

def words(saved, pipe, seed=2):
    g = torch.Generator().manual_seed(seed)
    size, c = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    x = torch.randn(1, c, size, size, generator=g)
    tokens = torch.randn(1, 3, saved.promptnet.config.image_embed_dim, generator=g)
    with torch.no_grad():
        return saved.promptnet(x, torch.tensor([500]), tokens, x * 0.5)


def test_convert_writes_a_promptnet_folder_and_generate_reads_the_official_one_alike(sd, sd_tiny_dir, tmp_path,
                                                                                     capsys):
    official = write_official(tmp_path / "official", sd.unet, text_dim(sd))
    out = tmp_path / "converted"
    assert main(["convert", "promptnet", "--from-official", str(official), "--out", str(out)]) == 0
    saved = load_promptnet(out, sd)
    assert json.loads((out / "image_encoder.json").read_text()) == {
        "kind": "clip-vision", "path": str((official / "openclip").resolve())}
    assert saved.meta["converted_from"] == str(official.resolve())
    in_memory = load_promptnet(official, sd)
    assert torch.equal(words(saved, sd), words(in_memory, sd))
    # generate --promptnet with the official folder converts it in memory: the same images as the written folder
    image = tmp_path / "ref.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    runs = {}
    for name, promptnet in (("official", official), ("converted", out)):
        capsys.readouterr()
        assert main(["generate", "--model", str(sd_tiny_dir), "--promptnet", str(promptnet), "--image", str(image),
                     "--prompt", "a S* on the grass", "--steps", "2", "--out", str(tmp_path / name)]) == 0
        runs[name] = [np.asarray(Image.open(p)) for p in sorted((tmp_path / name).glob("*.png"))
                      if p.name != "grid.png"]
    assert len(runs["official"]) == len(runs["converted"]) == 1
    assert np.array_equal(runs["official"][0], runs["converted"][0])


def test_convert_a_weights_file_with_model_and_image_encoder(sd, sd_tiny_dir, tmp_path):
    state = official_state(sd.unet, text_dim(sd), seed=3)
    torch.save(state, tmp_path / "promptnet.bin")
    clip = write_clip(tmp_path / "clip")
    out = tmp_path / "converted"
    assert main(["convert", "promptnet", "--from-official", str(tmp_path / "promptnet.bin"), "--model",
                 str(sd_tiny_dir), "--image-encoder", str(clip), "--dtype", "fp16", "--out", str(out)]) == 0
    assert {v.dtype for v in load_file(out / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}
    saved = load_promptnet(out, sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    tokens = torch.randn(1, 3, IMAGE_DIM, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = saved.promptnet.double()(x, torch.tensor([500]), tokens, x)
    want = official_forward({k: v.half().double() for k, v in state.items()}, sd.unet, x, torch.tensor([500]),
                            tokens, x)
    assert (got - want).abs().max() < 1e-6 * max(1.0, want.abs().max().item())


@pytest.fixture
def paths(sd, sd_tiny_dir, tmp_path):
    official = write_official(tmp_path / "official", sd.unet, text_dim(sd))
    no_clip = write_official(tmp_path / "no-clip", sd.unet, text_dim(sd), clip=False)
    torch.save(official_state(sd.unet, text_dim(sd)), tmp_path / "alone.bin")
    narrow = write_clip(tmp_path / "narrow-clip", width=64)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    return {"official": official, "no_clip": no_clip, "alone": tmp_path / "alone.bin", "narrow": narrow,
            "existing": existing, "plain": tmp_path / "plain", "sd": sd_tiny_dir, "out": tmp_path / "out",
            "missing": tmp_path / "missing"}


CONVERT = ["convert", "promptnet", "--from-official"]
ERRORS = {
    "no-image-encoder": (CONVERT + ["{no_clip}", "--out", "{out}"], "has no image encoder .*pass --image-encoder"),
    "file-without-model": (CONVERT + ["{alone}", "--out", "{out}"], "has no config.json next to it: pass --model"),
    "not-official": (CONVERT + ["{plain}", "--out", "{out}"], "is not an official ProFusion PromptNet"),
    "missing": (CONVERT + ["{missing}", "--out", "{out}"], "does not exist"),
    "out-exists": (CONVERT + ["{official}", "--out", "{existing}"], "already holds a PromptNet"),
    "encoder-width": (CONVERT + ["{official}", "--image-encoder", "{narrow}", "--out", "{out}"],
                      "takes 1024-d image tokens, the CLIP model in .* gives 64-d"),
    "generate-without-encoder": (["generate", "--model", "{sd}", "--promptnet", "{no_clip}", "--image", "{alone}",
                                  "--prompt", "S*", "--out", "{out}"], "convert it with `conceptkit convert promptnet"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_convert_errors_are_one_line(case, paths, capsys):
    template, pattern = ERRORS[case]
    argv = [a.format(**paths) for a in template]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert not paths["out"].exists()
