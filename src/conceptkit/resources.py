"""Memory: the low-memory switches for large images, and turning out-of-memory errors into one line of advice.

Large images: above LOW_MEMORY_FACTOR times the model's native pixel count (SD 1.5, native 512x512: above
1024x1024; the bundled toy model, native 64x64: above 128x128), or with `generate --low-memory`, generation
- decodes the latents with the VAE in tiles (`vae.enable_tiling()`) and one image at a time (`vae.enable_slicing()`),
- runs one image per UNet batch,
- and computes attention in slices (`pipe.enable_attention_slicing()`) only where PyTorch has no fused
  scaled-dot-product attention (torch < 2.0): SDPA never materialises the attention matrix, and replacing it with
  sliced attention costs memory and time (measured on the toy model at 256x256, CPU, 2 steps: 611 MB / 4.8 s
  without any saver, 815 MB / 11.0 s with attention slicing on).
Each lowers peak memory at some cost in speed; tiling blends tile borders, so a tiled decode can differ from the
untiled one by a few levels near the seams. The switches are turned off again afterwards (a pipeline is reused).
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

LOW_MEMORY_FACTOR = 4  # large = more than 4x the native pixel count (twice the native side)

OOM_PATTERN = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|DefaultCPUAllocator", re.I)


def is_large(pipe, height: int, width: int) -> bool:
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return height * width > LOW_MEMORY_FACTOR * native * native


@contextlib.contextmanager
def memory_savers(pipe, enable: bool) -> Iterator[bool]:
    """Within the block, VAE tiling + slicing and attention slicing are on when `enable` (then off again)."""
    if not enable:
        yield False
        return
    pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    sliced = not sdpa_available()
    if sliced:
        pipe.enable_attention_slicing()
    try:
        yield True
    finally:
        pipe.vae.disable_tiling()
        pipe.vae.disable_slicing()
        if sliced:
            pipe.disable_attention_slicing()


def sdpa_available() -> bool:
    import torch.nn.functional as F

    return hasattr(F, "scaled_dot_product_attention")


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), a MemoryError, or a RuntimeError saying the allocator ran out (CPU)."""
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and bool(OOM_PATTERN.search(str(error)))


ADVICE = {
    "generate": "fewer images at once (--num-images), a smaller --width/--height, or --low-memory (VAE tiling and "
                "slicing, one image per batch)",
    "compose": "fewer --num-images or methods, a smaller --width/--height, or fewer LoRAs",
    "learn": "a smaller --batch (with --grad-accum to keep the effective batch), a lower --resolution, or on a GPU "
             "--mixed-precision fp16/bf16 (and --gradient-checkpointing for ti)",
    "evaluate": "fewer --seeds, or run on a machine with more memory",
}


def oom_advice(command: str | None, error: BaseException) -> str:
    import torch

    where = "GPU" if isinstance(error, torch.OutOfMemoryError) else "memory"
    advice = ADVICE.get(command or "", "smaller inputs, or a machine with more memory")
    return f"out of {where} ({type(error).__name__}): try {advice}; close other programs that use it"
