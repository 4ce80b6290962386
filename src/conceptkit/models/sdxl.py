"""What is different about Stable Diffusion XL, in one place: two text encoders and the UNet's added conditioning.

SDXL conditions its UNet on the two CLIP encoders' penultimate hidden states, concatenated (768 + 1280 = 2048
wide), and, through `added_cond_kwargs`, on the second encoder's pooled (projected) embedding and six "time ids"
(original size, crop corner, target size). Prompts are encoded by the pipeline's own `encode_prompt`; the helpers
here do the same arithmetic on token ids for the trainers and CLoRA's branches, which need the encoders'
input embeddings spliced or per-row adapters.
"""
from __future__ import annotations

import torch

from ..errors import UserError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# the community single-file embedding keys (AUTOMATIC1111, ComfyUI), in text-encoder order
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")


def is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def encoders(pipe) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, text encoder) of each text encoder the model has: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if is_sdxl(pipe):
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def refuse_unless_sd(pipe, what: str) -> None:
    """One line for methods that are built for SD 1.x/2.x's single text encoder."""
    if is_sdxl(pipe):
        raise UserError(f"{what} is for Stable Diffusion 1.x/2.x models only (its PromptNet writes one word into the "
                        "single text encoder); this is an SDXL model: pass --model with an SD 1.x/2.x base model")


def time_ids(pipe, height: int, width: int, rows: int) -> torch.Tensor:
    """(rows, 6) SDXL time ids for an image of height x width: original size = target size, no crop (the
    pipeline's defaults), checked against the UNet by diffusers' own `_get_add_time_ids`."""
    projection = pipe.text_encoder_2.config.projection_dim
    try:
        ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=torch.float32,
                                     text_encoder_projection_dim=projection)
    except ValueError as error:
        raise UserError(f"this SDXL model's UNet does not take the pooled embedding and time ids its text encoder "
                        f"gives ({str(error).splitlines()[0][:160]}): pass a complete SDXL model") from None
    return ids.to(pipe.unet.device).repeat(rows, 1)


def added_conditioning(pooled: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)}


def tokenize(tokenizer, texts: list[str], device) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_ids(pipe, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, L, 2048-ish), pooled (B, d2)) of token ids, one tensor per encoder: `encode_prompt`'s arithmetic
    (each encoder's penultimate hidden state, concatenated; the second encoder's projected pooled output)."""
    hidden, pooled = [], None
    for (_, encoder), encoder_ids in zip(encoders(pipe), ids):
        out = encoder(encoder_ids.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].ndim == 2:
            pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


def encode_texts(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_ids(pipe, [tokenize(tok, texts, enc.device) for tok, enc in encoders(pipe)])


def encode_prompts(pipe, prompts: list[str], negative_prompt: str | None, guided: bool, height: int, width: int):
    """(embeddings, added_cond_kwargs) for `prompts`, [negatives; prompts] when guided, by the pipeline's own
    `encode_prompt` (Textual Inversion tokens, text-encoder LoRAs, SDXL's zeroed empty negative prompt)."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    negatives = [negative_prompt] * len(prompts) if negative_prompt else None
    cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
        prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
        negative_prompt=negatives)
    if guided:
        cond, pooled = torch.cat([uncond, cond]), torch.cat([pooled_uncond, pooled])
    return cond, added_conditioning(pooled, time_ids(pipe, height, width, len(cond)), dtype)
