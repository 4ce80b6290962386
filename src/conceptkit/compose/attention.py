"""Cross-attention capture (§2.3): explicit softmax(QKᵀ·scale) only where the maps are used.

`AttentionStore` collects the probabilities of cross-attention layers whose query length equals r_h·r_w; every
other layer keeps the fast SDPA path (the official processor computes explicit probabilities in every layer;
`explicit_everywhere=True` reproduces that for the reference benchmark). The maps stay in the autograd graph,
so the contrastive loss can be differentiated with respect to the latent.
"""
from __future__ import annotations

import contextlib

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from ..errors import UserError


class MapsComplete(Exception):
    """Raised inside the UNet once a forward has every map it captures (AttentionStore.maps_only)."""


class AttentionStore:
    def __init__(self, res: tuple[int, int]):
        self.res = res
        self.maps: list[torch.Tensor] = []  # (B, heads, Q, tokens) per captured layer, current forward
        self.seen_queries: set[int] = set()
        self.layers: int | None = None  # maps a whole forward captures (known after the first one)
        self.stop_at: int | None = None  # a forward raises MapsComplete once it holds this many maps

    def complete(self) -> None:
        """A whole forward has run: remember how many maps it captured."""
        self.layers = len(self.maps)

    @contextlib.contextmanager
    def maps_only(self):
        """Within the block, a forward raises MapsComplete as soon as it has captured as many maps as a whole
        forward does (the rest of the UNet is not run); the caller catches it. Before a whole forward has been
        seen, forwards run to the end."""
        self.stop_at = self.layers
        try:
            yield
        finally:
            self.stop_at = None

    def reset(self) -> None:
        self.maps = []

    def wants(self, queries: int) -> bool:
        self.seen_queries.add(queries)
        return queries == self.res[0] * self.res[1]

    def aggregate(self, rows: list[list[int]]) -> torch.Tensor:
        """(len(rows), r_h, r_w, tokens): for each branch, the mean over layers, heads and its batch rows."""
        if not self.maps:
            sides = sorted({int(q ** 0.5) for q in self.seen_queries}, reverse=True)
            raise UserError(f"no cross-attention layer works at {self.res[0]}x{self.res[1]}: pass --attn-res one of "
                            f"{', '.join(map(str, sides))}")
        stacked = torch.stack(self.maps)  # (layers, B, heads, Q, tokens)
        per_row = stacked.mean(dim=(0, 2))  # (B, Q, tokens)
        out = torch.stack([per_row[r].mean(0) for r in rows])
        return out.reshape(len(rows), self.res[0], self.res[1], -1)


class CaptureProcessor:
    """Explicit attention for the captured cross-attention layers; the wrapped processor everywhere else."""

    def __init__(self, store: AttentionStore, fallback):
        self.store, self.fallback = store, fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if (encoder_hidden_states is None or hidden_states.ndim != 3 or attn.spatial_norm is not None
                or attn.group_norm is not None or not self.store.wants(hidden_states.shape[1])):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        batch, _, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        self.store.maps.append(probs.view(batch, attn.heads, *probs.shape[1:]))
        if len(self.store.maps) == self.store.stop_at:
            raise MapsComplete
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def capturing(unet, store: AttentionStore, explicit_everywhere: bool = False):
    """Install capture processors on every attention module of `unet`; restore the originals afterwards."""
    original = unet.attn_processors
    fallback = AttnProcessor() if explicit_everywhere else AttnProcessor2_0()
    unet.set_attn_processor({name: CaptureProcessor(store, fallback) for name in original})
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


def default_attn_res(latent_hw: tuple[int, int], attn_res: int | None, deepest: int | None = None) -> tuple[int, int]:
    """(rows, cols) of the maps. The spec's H/32 is latent/4 (16x16 for SD at 512; not (W, H), a §5 quirk).
    `deepest` (SDXL): the downsampling of the UNet's deepest level, whose transformer blocks give the maps (latent/4,
    32x32 at 1024 px, on SDXL itself: the ten-block level)."""
    if attn_res is not None:
        return attn_res, latent_hw[1] * attn_res // latent_hw[0]
    h, w = latent_hw
    if deepest is not None:
        return -(-h // deepest), -(-w // deepest)
    if h // 4 >= 8:
        return -(-h // 4), -(-w // 4)
    side = min(8, h)  # tiny models (the bundled 16x16 latents): 8x8 maps, not 4x4
    return side, w * side // h
