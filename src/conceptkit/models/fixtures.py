"""Offline test fixtures with the Stable Diffusion 1.x architecture.

- `write_sd_clip_tokenizer` rebuilds SD 1.x's real CLIP tokenizer files from the BPE table that ships inside the
  open_clip_torch wheel, so tokenization matches real SD without downloading anything.
- `build_tiny_sd` writes a tiny random-weight StableDiffusionPipeline folder (SD 1.x block layout, 768-dim text
  conditioning, 8x VAE, real tokenizer): small and fast enough for unit tests.
- `build_sd15_width` writes a random-weight folder of SD 1.5's full sizes (860M-parameter UNet, ViT-L/14 text
  encoder, SD's VAE): for speed checks at 512 px on a GPU (benchmarks/gpu_speed.sh), too slow for unit tests.
- `write_single_file` writes a pipeline as one original-layout (LDM / AUTOMATIC1111) `.safetensors` checkpoint, the
  format `StableDiffusionPipeline.from_single_file` reads.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import torch

from conceptkit.errors import UserError
from conceptkit.models.clip_tokenizer import clip_vocab, write_clip_tokenizer

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
# CLIP keeps the first 49152 - 256 - 2 merges of the BPE table; line 0 is a version header.
CLIP_MERGE_COUNT = 49152 - 256 - 2

SD1_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
SD1_VAE_SCALING_FACTOR = 0.18215
SD1_CROSS_ATTENTION_DIM = 768


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

def open_clip_bpe_path() -> Path:
    """Path of the BPE table inside the installed open_clip package, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    raise UserError(f"open_clip's {BPE_FILE_NAME} not found; install it with: pip install --no-deps open_clip_torch")


def read_clip_merges(bpe_path: Path) -> list[tuple[str, str]]:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:CLIP_MERGE_COUNT + 1]]


def write_sd_clip_tokenizer(folder: str | Path) -> Path:
    """Write SD 1.x's CLIP tokenizer (vocab.json, merges.txt, configs) into `folder`; returns the folder."""
    merges = read_clip_merges(open_clip_bpe_path())
    if len(clip_vocab(merges)) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"built a CLIP vocab of {len(clip_vocab(merges))} tokens, expected {CLIP_VOCAB_SIZE}")
    return write_clip_tokenizer(folder, merges, CLIP_MAX_LENGTH)


# ---------------------------------------------------------------------------------------------------------------
# Tiny SD 1.x pipeline
# ---------------------------------------------------------------------------------------------------------------

def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        norm_num_groups=32,
        attention_head_dim=8,
        cross_attention_dim=SD1_CROSS_ATTENTION_DIM,
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    # Four blocks give SD's 8x downsampling; channels are tiny.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=SD1_VAE_SCALING_FACTOR,
    )


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    # hidden_size must equal the UNet's cross_attention_dim (768, as in SD 1.x); depth and MLP width are tiny.
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=SD1_CROSS_ATTENTION_DIM,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=12,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=SD1_CROSS_ATTENTION_DIM,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


def tiny_sd_pipeline(tokenizer_folder: str | Path, seed: int = 0):
    """A tiny random-weight StableDiffusionPipeline with SD 1.x's architecture (in memory), seeded per component."""
    torch.manual_seed(seed)
    unet = tiny_unet()
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    torch.manual_seed(seed + 2)
    return sd1_pipeline(unet, vae, tiny_text_encoder(), tokenizer_folder)


def sd1_pipeline(unet, vae, text_encoder, tokenizer_folder: str | Path):
    """A StableDiffusionPipeline of these components with SD 1.x's tokenizer files and scheduler, no safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_folder)),
        scheduler=PNDMScheduler(**SD1_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_sd_folder(folder: str | Path, make_pipeline, seed: int) -> Path:
    """Save make_pipeline(tokenizer_folder, seed) as a diffusers folder at `folder` (SD 1.x's real tokenizer files,
    rebuilt offline); returns the folder."""
    import tempfile

    from conceptkit.models.loading import quiet_loading_bars

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch, quiet_loading_bars():
        pipe = make_pipeline(write_sd_clip_tokenizer(Path(scratch) / "tokenizer"), seed)
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny seeded SD 1.x-architecture diffusers folder to `folder`; returns the folder."""
    return write_sd_folder(folder, tiny_sd_pipeline, seed)


def sd15_width_pipeline(tokenizer_folder: str | Path, seed: int = 0):
    """A random-weight StableDiffusionPipeline of SD 1.5's sizes (in memory), seeded per component: the diffusers
    classes' defaults are SD 1.5's blocks (UNet 320/640/1280/1280, 2 layers, 8 heads; VAE 128/256/512/512), given
    SD 1.5's 768-dim conditioning, 64x64 latents (512 px) and CLIP ViT-L/14's text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=SD1_CROSS_ATTENTION_DIM)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=512, scaling_factor=SD1_VAE_SCALING_FACTOR)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=SD1_CROSS_ATTENTION_DIM, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
        projection_dim=SD1_CROSS_ATTENTION_DIM, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()
    return sd1_pipeline(unet, vae, text_encoder, tokenizer_folder)


def build_sd15_width(folder: str | Path, seed: int = 0) -> Path:
    """Write a random-weight SD 1.5-sized diffusers folder (float32, about 4.3 GB) to `folder`; returns it."""
    return write_sd_folder(folder, sd15_width_pipeline, seed)


# ---------------------------------------------------------------------------------------------------------------
# Single-file (original LDM layout) checkpoint
# ---------------------------------------------------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."

UNET_TOP_LEVEL_NAMES = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's text_time embedding
    "add_embedding.linear_2.": "label_emb.0.2.",
}
UNET_RESNET_NAMES = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
VAE_ATTENTION_NAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def rename_leading(name: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def split_block_key(key: str, block: str) -> tuple[int, str, int, str]:
    """'down_blocks.2.resnets.1.conv1.weight' -> (2, 'resnets', 1, 'conv1.weight')."""
    block_index, kind, layer_index, rest = key[len(block) + 1:].split(".", 3)
    return int(block_index), kind, int(layer_index), rest


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """Diffusers UNet2DConditionModel key -> LDM UNetModel key."""
    per_level = layers_per_block + 1
    if key.startswith("down_blocks."):
        block, kind, layer, rest = split_block_key(key, "down_blocks")
        first = 1 + block * per_level
        if kind == "resnets":
            return f"input_blocks.{first + layer}.0.{rename_leading(rest, UNET_RESNET_NAMES)}"
        if kind == "attentions":
            return f"input_blocks.{first + layer}.1.{rest}"
        return f"input_blocks.{first + layers_per_block}.0.op.{rest.removeprefix('conv.')}"
    if key.startswith("up_blocks."):
        block, kind, layer, rest = split_block_key(key, "up_blocks")
        first = block * per_level
        if kind == "resnets":
            return f"output_blocks.{first + layer}.0.{rename_leading(rest, UNET_RESNET_NAMES)}"
        if kind == "attentions":
            return f"output_blocks.{first + layer}.1.{rest}"
        # LDM puts the upsampler after the attention when the level has one.
        slot = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{first + layers_per_block}.{slot}.{rest}"
    if key.startswith("mid_block."):
        _, kind, layer, rest = key.split(".", 3)
        if kind == "resnets":
            return f"middle_block.{2 * int(layer)}.{rename_leading(rest, UNET_RESNET_NAMES)}"
        return f"middle_block.1.{rest}"
    renamed = rename_leading(key, UNET_TOP_LEVEL_NAMES)
    if renamed == key:
        raise ValueError(f"no LDM name for UNet weight {key!r}")
    return renamed


def vae_resnet_name_to_ldm(name: str) -> str:
    return name.replace("conv_shortcut.", "nin_shortcut.")


def vae_mid_key_to_ldm(rest: str) -> str:
    """'resnets.1.conv1.weight' -> 'block_2.conv1.weight'; 'attentions.0.to_q.weight' -> 'attn_1.q.weight'."""
    kind, layer, inner = rest.split(".", 2)
    if kind == "resnets":
        return f"block_{int(layer) + 1}.{vae_resnet_name_to_ldm(inner)}"
    return f"attn_{int(layer) + 1}.{rename_leading(inner, VAE_ATTENTION_NAMES)}"


def vae_key_to_ldm(key: str, num_levels: int) -> str:
    """Diffusers AutoencoderKL key -> LDM AutoencoderKL key."""
    coder, rest = key.split(".", 1)
    if coder not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    if rest.startswith("conv_norm_out."):
        return f"{coder}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    if rest.startswith("mid_block."):
        return f"{coder}.mid.{vae_mid_key_to_ldm(rest.removeprefix('mid_block.'))}"
    if rest.startswith(("down_blocks.", "up_blocks.")):
        blocks, index, kind, inner = rest.split(".", 3)
        # LDM numbers decoder levels from the lowest resolution up; diffusers from the top down.
        level = int(index) if blocks == "down_blocks" else num_levels - 1 - int(index)
        ldm_blocks = "down" if blocks == "down_blocks" else "up"
        if kind == "resnets":
            layer, resnet_inner = inner.split(".", 1)
            return f"{coder}.{ldm_blocks}.{level}.block.{layer}.{vae_resnet_name_to_ldm(resnet_inner)}"
        sampler = "downsample" if blocks == "down_blocks" else "upsample"
        return f"{coder}.{ldm_blocks}.{level}.{sampler}.{inner.removeprefix('0.')}"
    return key  # conv_in, conv_out


def is_vae_attention_projection(ldm_key: str) -> bool:
    return ".attn_" in ldm_key and ldm_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))


def unet_state_dict_to_ldm(unet) -> dict[str, torch.Tensor]:
    up_blocks_with_attention = {index for index, block_type in enumerate(unet.config.up_block_types)
                                if "CrossAttn" in block_type}
    layers_per_block = unet.config.layers_per_block
    return {UNET_PREFIX + unet_key_to_ldm(key, layers_per_block, up_blocks_with_attention): tensor
            for key, tensor in unet.state_dict().items()}


def vae_state_dict_to_ldm(vae) -> dict[str, torch.Tensor]:
    num_levels = len(vae.config.block_out_channels)
    converted = {}
    for key, tensor in vae.state_dict().items():
        ldm_key = vae_key_to_ldm(key, num_levels)
        if is_vae_attention_projection(ldm_key):
            tensor = tensor[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions, not linear layers
        converted[VAE_PREFIX + ldm_key] = tensor
    return converted


def text_encoder_state_dict_to_ldm(text_encoder, prefix: str = TEXT_ENCODER_PREFIX) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); older versions still have it.
    return {prefix + key.removeprefix("text_model."): tensor
            for key, tensor in text_encoder.state_dict().items()}


def pipeline_to_ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    state_dict = {}
    state_dict.update(unet_state_dict_to_ldm(pipe.unet))
    state_dict.update(vae_state_dict_to_ldm(pipe.vae))
    state_dict.update(text_encoder_state_dict_to_ldm(pipe.text_encoder))
    return {key: tensor.detach().cpu().contiguous() for key, tensor in state_dict.items()}


def write_single_file(pipeline_or_folder, path: str | Path) -> Path:
    """Write a StableDiffusionPipeline (or a diffusers folder) as one LDM-layout `.safetensors` file."""
    from safetensors.torch import save_file

    pipe = pipeline_or_folder
    if isinstance(pipeline_or_folder, (str, Path)):
        from conceptkit.models.loading import load_pipeline

        pipe = load_pipeline(str(pipeline_or_folder))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(pipeline_to_ldm_state_dict(pipe), str(path), metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------------------------
# Tiny scoring models (CLIP-I / CLIP-T / DINO tests): random weights, the real file layouts
# ---------------------------------------------------------------------------------------------------------------

def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A random-weight CLIPModel folder (32x32 images, 1-layer towers, SD 1.x's real CLIP tokenizer), saved with
    its image processor and tokenizer as `openai/clip-vit-*` folders are."""
    from transformers import CLIPConfig, CLIPImageProcessorPil as CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": CLIP_VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": CLIP_MAX_LENGTH,
                     "bos_token_id": CLIP_VOCAB_SIZE - 2, "eos_token_id": CLIP_VOCAB_SIZE - 1,
                     "pad_token_id": CLIP_VOCAB_SIZE - 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    write_sd_clip_tokenizer(folder / "_tokenizer")
    CLIPTokenizer.from_pretrained(folder / "_tokenizer").save_pretrained(folder)
    import shutil

    shutil.rmtree(folder / "_tokenizer")
    return folder


def build_tiny_dinov2(folder: str | Path, seed: int = 0) -> Path:
    """A random-weight Dinov2Model folder (32x32 images, patch 8, 1 layer) with DINOv2's image processor settings
    scaled down (shortest side 36, centre crop 32, ImageNet mean/std)."""
    from transformers import BitImageProcessorPil as BitImageProcessor, Dinov2Config, Dinov2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             image_size=32, patch_size=8)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_convert_rgb=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder
