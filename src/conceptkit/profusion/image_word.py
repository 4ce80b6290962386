"""One reference image as a word: PromptNet's S* for the current latent, for prompts outside ProFusion's own sampler.

A composition (compose/) can hold an image as one of its concepts: the branch of that concept has a word slot, and
at every model call S* = PromptNet(x_ref, t, tokens, x_t) is computed from the latent being denoised, exactly as
ProFusion's plain sampling does (§3.6 a), and spliced into that branch's prompt (profusion/prompts.py); the encoder's
output at the word is read at the folder's recommended scale (`emb_scale`, s), as plain sampling reads it.
S* is a condition, not a path for gradients: CLoRA's latent update differentiates the UNet, not PromptNet.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .saved import SavedPromptNet


class ImageWord:
    def __init__(self, pipe, saved: SavedPromptNet, image: str | Path, seed: int = 0):
        from ..learn.images import load_reference_image
        from .sampling import recommended_plain, reference_latents

        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        reference = load_reference_image(image, size)
        self.promptnet = saved.promptnet
        self.emb_scale = recommended_plain(saved).emb_scale  # compose/branches.py WordRows scales the word's row
        with torch.no_grad():
            # a PromptNet trained on posterior samples gets one (fixed: the same word for every seed)
            self.x_ref = reference_latents(pipe, saved, reference, [torch.Generator().manual_seed(seed)])
            self.tokens = saved.image_encoder(reference.float().to(pipe.unet.device), self.x_ref)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        """S* (d,) for the model input x (1, C, h, w) at timestep t."""
        net = self.promptnet
        return net(self.x_ref.to(net.dtype), t, self.tokens, x.detach().to(net.dtype)).reshape(-1)
