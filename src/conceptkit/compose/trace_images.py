"""PNG grids of a composition's trace: per step, each concept's attention map and each branch's mask."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

CELL = 64


def _cell(a: torch.Tensor, normalise: bool = True) -> Image.Image:
    a = a.float()
    if normalise:  # attention maps: stretch to the full grey range; masks are already 0/1
        a = (a - a.min()) / (a.max() - a.min() + 1e-12)
    img = Image.fromarray((a.numpy() * 255).astype(np.uint8), mode="L")
    return img.resize((CELL, CELL * a.shape[0] // a.shape[1]), Image.Resampling.NEAREST)


def _grid(rows: list[list[Image.Image]], header: list[str], labels: list[str]) -> Image.Image:
    h = max(im.height for row in rows for im in row)
    left, top = 34, 14
    out = Image.new("RGB", (left + CELL * len(header), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for j, text in enumerate(header):
        draw.text((left + CELL * j + 2, 1), text[:10], fill="black")
    for i, (label, row) in enumerate(zip(labels, rows)):
        draw.text((2, top + h * i + h // 2 - 5), label, fill="black")
        for j, im in enumerate(row):
            out.paste(im.convert("RGB"), (left + CELL * j, top + h * i))
    return out


def trace_grids(trace, bp, every: int | None = None) -> tuple[Image.Image, Image.Image]:
    """(attention grid, mask grid); rows are steps (about 10 of them), columns concepts / branches."""
    n = len(trace.steps)
    every = every or max(1, n // 10)
    picked = list(range(0, n, every))
    names = [c.name for c in bp.concepts]
    map_rows, mask_rows = [], []
    for i in picked:
        maps, masks = trace.maps[i], trace.masks[i]
        # concept c in its own branch (c+1), averaged over its trigger+class tokens
        map_rows.append([_cell(maps[c + 1][:, :, bp.mask_indices[c + 1]].mean(-1)) for c in range(len(names))])
        mask_rows.append([_cell(m, normalise=False) for m in masks])
    labels = [f"t{trace.steps[i]}" for i in picked]
    attention = _grid(map_rows, names, labels)
    mask_grid = _grid(mask_rows, ["base"] + names, labels)
    return attention, mask_grid
