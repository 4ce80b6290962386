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
TIME_EMBED_DIM = 8  # addition_time_embed_dim (256 in SDXL)


def tiny_sdxl_unet():
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
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_WIDTH,  # time ids + pooled embedding
        cross_attention_dim=2 * TEXT_WIDTH,  # both encoders' hidden states, concatenated
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


def tiny_clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=TEXT_WIDTH,
        layer_norm_eps=1e-05,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def tiny_sdxl_pipeline(tokenizer_folder: str | Path, seed: int = 0):
    """A tiny random-weight StableDiffusionXLPipeline (in memory), seeded per component."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = tiny_sdxl_unet()
    torch.manual_seed(seed + 1)
    vae = tiny_sdxl_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(tiny_clip_config()).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config()).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tokenizer_folder), pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny seeded SDXL-architecture diffusers folder to `folder`; returns the folder."""
    import tempfile

    from .loading import quiet_loading_bars

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch, quiet_loading_bars():
        pipe = tiny_sdxl_pipeline(write_sd_clip_tokenizer(Path(scratch) / "tokenizer"), seed)
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder
