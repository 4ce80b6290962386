"""Plain text-to-image sampling as a plug-in of the loop: the prompts' conditioning and classifier-free guidance.

The prompts are encoded by diffusers' own `encode_prompt` (Textual Inversion's multi-vector tokens, LoRA text
encoder layers and clip-skip handled as the pipeline does), and every step is the pipeline's arithmetic: one UNet
call on [negatives; prompts], ε_u + w (ε_c − ε_u). A guidance scale of 1 or less means no negative branch, as in
the pipeline.
"""
from __future__ import annotations

import contextlib

import torch

from ..models.sdxl import encode_prompts, is_sdxl
from .loop import Step, guide, lora_acts, work_dtype


@contextlib.contextmanager
def adapters_disabled(unet):
    """The UNet without its LoRA layers (PEFT's own switch), restored after."""
    if not getattr(unet, "peft_config", None):
        yield
        return
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


class PromptModel:
    """ε (or v) for a batch of prompts, guided: the `model` of `loop.denoise` for plain sampling."""

    def __init__(self, pipe, prompts: list[str], negative_prompt: str | None, guidance_scale: float,
                 guidance_rescale: float = 0.0, size: tuple[int, int] | None = None, lora_end: float = 1.0,
                 steps: int | None = None):
        """size: (height, width) of the images, for SDXL's time ids (default: the model's native size).
        lora_end: the loaded LoRAs' UNet layers act on this first share of the `steps` only (loop.py's
        lora_acts); the prompts, encoded once, keep any text-encoder LoRA."""
        if lora_end < 1 and steps is None:
            raise ValueError("lora_end needs the number of steps")
        self.unet, self.scale, self.rescale = pipe.unet, guidance_scale, guidance_rescale
        self.lora_end, self.steps = lora_end, steps
        self.guided = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        self.added = None
        with torch.no_grad():
            if is_sdxl(pipe):
                native = pipe.unet.config.sample_size * pipe.vae_scale_factor
                height, width = size or (native, native)
                self.embeddings, self.added = encode_prompts(pipe, prompts, negative_prompt, self.guided, height,
                                                             width)
            else:
                cond, uncond = pipe.encode_prompt(
                    prompts, pipe.unet.device, 1, self.guided,
                    [negative_prompt] * len(prompts) if negative_prompt else None)
                self.embeddings = torch.cat([uncond, cond]) if self.guided else cond
        self.work = work_dtype(pipe.unet)

    def __call__(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        x = torch.cat([x] * 2) if self.guided else x
        loras_off = self.lora_end < 1 and not lora_acts(step.index, self.steps, self.lora_end)
        with adapters_disabled(self.unet) if loras_off else contextlib.nullcontext():
            out = self.unet(x.to(self.unet.dtype), step.t, encoder_hidden_states=self.embeddings,
                            added_cond_kwargs=self.added, return_dict=False)[0].to(self.work)
        if not self.guided:
            return out
        uncond, cond = out.chunk(2)
        return guide(uncond, cond, self.scale, self.rescale)
