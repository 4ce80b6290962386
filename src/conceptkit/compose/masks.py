"""Attention-derived masks (§2.6): which branch's noise prediction holds where; no gradients."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dilate(m: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(m, 3, stride=1, padding=1)


def erode(m: torch.Tensor) -> torch.Tensor:
    return 1 - F.max_pool2d(1 - m, 3, stride=1, padding=1)


@torch.no_grad()
def attention_masks(maps: torch.Tensor, mask_indices: list[list[int]], latent_hw: tuple[int, int],
                    threshold: float = 0.4, channels: int = 4, *, dilation: bool = False, erosion: bool = False,
                    opening: bool = False, closing: bool = False) -> torch.Tensor:
    """maps (K, r_h, r_w, tokens) -> binary masks (K, 1, channels, h, w); every latent pixel is covered."""
    K = maps.shape[0]
    masks = torch.zeros(K, 1, *maps.shape[1:3], device=maps.device)
    for p, indices in enumerate(mask_indices):
        for k in indices:
            a = maps[p, :, :, k].float()
            masks[p, 0] = torch.maximum(masks[p, 0], (a > threshold * a.max()).float())
    # morphology on the binary r x r masks, in the spec's order (the padding of max-pool is -inf, so borders
    # dilate only from inside and erode as if surrounded by mask)
    if dilation:
        masks = dilate(masks)
    if erosion:
        masks = erode(masks)
    if opening:
        masks = dilate(erode(masks))
    if closing:
        masks = erode(dilate(masks))
    masks[0] = torch.where(masks.sum(0) == 0, torch.ones_like(masks[0]), masks[0])  # background fallback
    masks = F.interpolate(masks, size=latent_hw, mode="nearest")
    return masks[:, :, None].expand(K, 1, channels, *latent_hw).contiguous()


def blend(eps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """eps (K, C, h, w), masks (K, 1, C, h, w) -> the mask-weighted mean over branches (1, C, h, w)."""
    m = masks[:, 0]
    return (m * eps).sum(0, keepdim=True) / m.sum(0, keepdim=True)
