"""PromptNet (ALGORITHMS.md §3.2): an encoder that maps a reference image to one word embedding S*.

It is a copy of the base UNet's encoder half (conv_in, time embedding, down blocks, mid block), initialised from
the UNet's weights, plus new layers with PyTorch's default init:
- `prompt_embedding` (conv 3x3 → SiLU → conv 3x3) adds the current noisy latent x_t to conv_in(x_ref);
- `context_proj` (Linear) maps the image encoder's tokens to the cross-attention width; every cross-attention
  layer of the copied blocks attends to them;
- one strided projection per feature map (after conv_in, after each down block, after the mid block) down to a
  common `g x g` grid, concatenated, and a last conv with kernel = stride = g to 1 x 1 → S* (B, 1, d_text).

The grid g is the mid block's resolution (or `projection_grid`) and each projection's kernel is (its resolution) / g.
For SD 2 at 64x64 latents this gives exactly the official kernels (8, 4, 2, 1, 1, 1) and an 8x8 grid; for the
bundled 16x16 model, (4, 2, 1, 1, 1) and a 4x4 grid. The official code's first kernel is max(2^(blocks-1), 8), so
on UNets with fewer than 4 blocks its grid is smaller than the mid block's: `projection_grid` reproduces it for
converted checkpoints (profusion/official.py). The official residual heads are computed and multiplied by 0 there;
they are omitted here, and the converter drops them.
"""
from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

ENCODER_PARTS = ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block")


class PromptNet(ModelMixin, ConfigMixin):
    config_name = "config.json"
    # the copied down and mid blocks recompute their activations in backward when it is on (pre-training's
    # --gradient-checkpointing)
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, unet_config: dict, image_embed_dim: int, text_embed_dim: int,
                 projection_channels: int = 128, sample_size: int | None = None,
                 projection_grid: int | None = None):
        super().__init__()
        unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
        unet = UNet2DConditionModel.from_config(unet_config)
        for name in ENCODER_PARTS:
            setattr(self, name, getattr(unet, name))
        del unet
        channels = list(unet_config["block_out_channels"])
        latent_channels = unet_config.get("in_channels", 4)
        size = sample_size or unet_config["sample_size"]
        n = len(channels)
        mid = size // 2 ** (n - 1)  # the mid block's resolution
        if mid < 1 or size % 2 ** (n - 1):
            raise ValueError(f"sample_size {size} is not divisible by 2^{n - 1}")
        grid = projection_grid or mid
        if mid % grid:
            raise ValueError(f"projection_grid {grid} does not divide the mid block's resolution {mid}")
        self.grid = grid
        self.prompt_embedding = nn.Sequential(
            nn.Conv2d(latent_channels, channels[0], 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels[0], channels[0], 3, padding=1))
        cross_dim = unet_config["cross_attention_dim"]
        cross_dim = cross_dim[0] if isinstance(cross_dim, (list, tuple)) else cross_dim
        self.context_proj = nn.Linear(image_embed_dim, cross_dim)
        resolutions = [size] + [size // 2 ** min(i + 1, n - 1) for i in range(n)] + [mid]
        in_channels = [channels[0]] + channels + [channels[-1]]
        self.projections = nn.ModuleList(
            nn.Conv2d(c, projection_channels, kernel_size=r // grid, stride=r // grid)
            for c, r in zip(in_channels, resolutions))
        self.to_word = nn.Conv2d(projection_channels * len(self.projections), text_embed_dim,
                                 kernel_size=grid, stride=grid)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, image_embed_dim: int, text_embed_dim: int,
                  projection_channels: int = 128) -> "PromptNet":
        """A PromptNet whose encoder half starts as a copy of `unet`'s (the new layers keep their default init)."""
        # keywords, so diffusers' config recorder stores every argument (positional ones end up "default")
        net = cls(unet_config={k: v for k, v in unet.config.items() if not k.startswith("_")},
                  image_embed_dim=image_embed_dim, text_embed_dim=text_embed_dim,
                  projection_channels=projection_channels)
        for name in ENCODER_PARTS:
            getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net.to(unet.device)

    def forward(self, reference: torch.Tensor, timestep: torch.Tensor | int, image_tokens: torch.Tensor,
                noisy: torch.Tensor) -> torch.Tensor:
        """S* (B, 1, d_text) from the clean reference latent, the timestep, the image encoder's tokens of the
        reference (B, N, D) and the current noisy latent x_t."""
        batch = reference.shape[0]
        t = torch.as_tensor(timestep, device=reference.device)
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)
        emb = self.time_embedding(self.time_proj(t).to(reference.dtype))
        context = self.context_proj(image_tokens.to(reference.dtype))
        h = self.conv_in(reference) + self.prompt_embedding(noisy.to(reference.dtype))
        features = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
            else:
                h, _ = block(hidden_states=h, temb=emb)
            features.append(h)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, encoder_hidden_states=context)
        features.append(h)
        grid = torch.cat([proj(f) for proj, f in zip(self.projections, features)], dim=1)
        return self.to_word(grid).flatten(1).unsqueeze(1)
