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
                    opening: bool = False, closing: bool = False, combine: str = "or",
                    exclusive: bool = False) -> torch.Tensor:
    """maps (K, r_h, r_w, tokens) -> binary masks (K, 1, channels, h, w); every latent pixel is covered.
    A branch's score is its tokens' maps, each divided by its maximum, then combine="or": their maximum (each token
    thresholded at threshold x its maximum, OR-ed: §2.6), or combine="sum": the maps summed first, then divided by
    the sum's maximum (each token counts by the attention it gets). Mask = score > threshold; exclusive=True keeps
    a pixel only in the branch whose score is highest there, so two concepts' branches never average."""
    K = maps.shape[0]
    scores = torch.zeros(K, 1, *maps.shape[1:3], device=maps.device)
    for p, indices in enumerate(mask_indices):
        if not indices:
            continue
        a = maps[p, :, :, indices].float()
        if combine == "sum":
            a = a.sum(-1)
            scores[p, 0] = a / a.max().clamp_min(1e-12)
        else:
            scores[p, 0] = (a / a.amax(dim=(0, 1)).clamp_min(1e-12)).amax(-1)
    masks = (scores > threshold).float()
    if exclusive:
        masks = masks * (scores >= scores.amax(0, keepdim=True)).float()
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


REGIONS = ("left", "right", "top", "bottom", "all")


def region_masks(regions: list[str] | None, n: int, latent_hw: tuple[int, int], channels: int = 4) -> torch.Tensor:
    """Fixed masks for regional composition: branch 0 (the base prompt) then one per concept, (n+1, 1, channels, h,
    w). `regions[i]` is concept i's region (a half of the image, or all of it); None: n equal vertical strips, left
    to right in slot order. Where no concept's region reaches, the base branch holds."""
    h, w = latent_hw
    masks = torch.zeros(n + 1, 1, h, w)
    if regions is None:
        for i in range(n):
            masks[i + 1, 0, :, i * w // n : (i + 1) * w // n] = 1
    else:
        if len(regions) != n:
            raise ValueError(f"{len(regions)} regions for {n} concepts: give one per concept")
        for i, region in enumerate(regions):
            if region not in REGIONS:
                raise ValueError(f"region {region!r}: use one of {', '.join(REGIONS)}")
            rows = slice(0, h // 2) if region == "top" else slice(h // 2, h) if region == "bottom" else slice(0, h)
            cols = slice(0, w // 2) if region == "left" else slice(w // 2, w) if region == "right" else slice(0, w)
            masks[i + 1, 0, rows, cols] = 1
    masks[0] = (masks[1:].sum(0) == 0).float()
    return masks[:, :, None].expand(n + 1, 1, channels, h, w).contiguous()
