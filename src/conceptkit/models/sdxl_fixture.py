"""An offline test fixture with the Stable Diffusion XL architecture.

`build_tiny_sdxl` writes a tiny random-weight StableDiffusionXLPipeline folder: two CLIP text encoders over SD's
real CLIP BPE vocabulary (the second a CLIPTextModelWithProjection whose projection is the pooled embedding, its
tokenizer padding with "!" as SDXL's does), a UNet with `addition_embed_type="text_time"` (pooled embedding plus
six size/crop time ids), cross-attention over both encoders' concatenated hidden states, and no attention in the
first level, as in SDXL. The widths are diffusers' own SDXL test widths (tests/pipelines/stable_diffusion_xl).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .fixtures import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, write_sd_clip_tokenizer

SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
SDXL_VAE_SCALING_FACTOR = 0.13025
TEXT_WIDTH = 32  # each encoder's hidden size (768 and 1280 in SDXL)
# diffusers' single-file loader tells the two encoders apart by width, so a single-file fixture needs them to differ.
TEXT_WIDTH_2_FOR_SINGLE_FILE = 48
TIME_EMBED_DIM = 8  # addition_time_embed_dim (256 in SDXL)


def tiny_sdxl_unet(text_width_2: int = TEXT_WIDTH):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + text_width_2,  # time ids + pooled embedding
        cross_attention_dim=TEXT_WIDTH + text_width_2,  # both encoders' hidden states, concatenated
        norm_num_groups=1,
    )


def tiny_sdxl_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=4,
        sample_size=64,
        scaling_factor=SDXL_VAE_SCALING_FACTOR,
    )


def tiny_clip_config(width: int = TEXT_WIDTH):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=width,
        layer_norm_eps=1e-05,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def tiny_sdxl_pipeline(tokenizer_folder: str | Path, seed: int = 0, text_width_2: int = TEXT_WIDTH):
    """A tiny random-weight StableDiffusionXLPipeline (in memory), seeded per component; `text_width_2` is the
    second encoder's width (and its pooled embedding's)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = tiny_sdxl_unet(text_width_2)
    torch.manual_seed(seed + 1)
    vae = tiny_sdxl_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_config()).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(text_width_2)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tokenizer_folder), pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl(folder: str | Path, seed: int = 0, text_width_2: int = TEXT_WIDTH) -> Path:
    """Write a tiny seeded SDXL-architecture diffusers folder to `folder`; returns the folder."""
    import tempfile

    from .loading import quiet_loading_bars

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch, quiet_loading_bars():
        pipe = tiny_sdxl_pipeline(write_sd_clip_tokenizer(Path(scratch) / "tokenizer"), seed, text_width_2)
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Single-file (original SGM layout, as Stability ships SDXL and AUTOMATIC1111 / ComfyUI read it) checkpoint
# ---------------------------------------------------------------------------------------------------------------

CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."  # CLIP ViT-L, in transformers' own layout
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG's text tower, in open_clip's layout
OPEN_CLIP_NAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.": "ln_final.",
}
OPEN_CLIP_LAYER_NAMES = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def open_clip_state_dict(text_encoder_2) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights in open_clip's text-tower names (`transformer.resblocks.N.…`, q/k/v
    concatenated into `attn.in_proj_*`, `text_projection` as the matrix open_clip right-multiplies by)."""
    from .fixtures import rename_leading

    weights = {key.removeprefix("text_model."): tensor for key, tensor in text_encoder_2.state_dict().items()}
    converted = {"text_projection": weights.pop("text_projection.weight").T}
    for layer in range(text_encoder_2.config.num_hidden_layers):
        for kind in ("weight", "bias"):
            converted[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
                [weights.pop(f"encoder.layers.{layer}.self_attn.{name}_proj.{kind}") for name in "qkv"])
    for key, tensor in weights.items():
        if key.startswith("encoder.layers."):
            layer, rest = key.removeprefix("encoder.layers.").split(".", 1)
            renamed = f"transformer.resblocks.{layer}.{rename_leading(rest, OPEN_CLIP_LAYER_NAMES)}"
        else:
            renamed = rename_leading(key, OPEN_CLIP_NAMES)
        if renamed in (key, f"transformer.resblocks.{key.removeprefix('encoder.layers.')}"):
            raise ValueError(f"no open_clip name for text_encoder_2 weight {key!r}")
        converted[renamed] = tensor
    return converted


def sdxl_pipeline_to_sgm_state_dict(pipe) -> dict[str, torch.Tensor]:
    from .fixtures import text_encoder_state_dict_to_ldm, unet_state_dict_to_ldm, vae_state_dict_to_ldm

    state_dict = {}
    state_dict.update(unet_state_dict_to_ldm(pipe.unet))
    state_dict.update(vae_state_dict_to_ldm(pipe.vae))
    state_dict.update(text_encoder_state_dict_to_ldm(pipe.text_encoder, CLIP_L_PREFIX))
    state_dict.update({OPEN_CLIP_PREFIX + key: tensor for key, tensor in open_clip_state_dict(pipe.text_encoder_2).items()})
    return {key: tensor.detach().cpu().contiguous() for key, tensor in state_dict.items()}


def write_sdxl_single_file(pipeline_or_folder, path: str | Path) -> Path:
    """Write a StableDiffusionXLPipeline (or an SDXL diffusers folder) as one original-layout `.safetensors` file:
    `model.diffusion_model.*`, `first_stage_model.*`, `conditioner.embedders.{0,1}.*`."""
    from safetensors.torch import save_file

    pipe = pipeline_or_folder
    if isinstance(pipeline_or_folder, (str, Path)):
        from .loading import load_pipeline

        pipe = load_pipeline(str(pipeline_or_folder), device="cpu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sdxl_pipeline_to_sgm_state_dict(pipe), str(path), metadata={"format": "pt"})
    return path
