"""Helpers shared by the PromptNet test files (a plain module, imported like tests/option_sweep.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_noise_images(folder: Path, count: int, height: int, width: int, seed: int) -> Path:
    """`count` random-noise images of height x width, no metadata, into folder (created)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def fixed_batch(pipe, encoder, b: int = 2, seed: int = 0) -> dict:
    """One deterministic promptnet_loss batch (reference = target latents, two timesteps)."""
    g = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    target = torch.randn(b, 4, size, size, generator=g)
    noise = torch.randn(b, 4, size, size, generator=g)
    return {"reference": target, "tokens": encoder(None, target), "target": target, "noise": noise,
            "timesteps": torch.tensor([300, 700])[:b]}
