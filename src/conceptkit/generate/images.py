"""Plain text-to-image generation: prompts x seeds through the denoising loop (loop.py), PNGs plus a grid.

Image j of every prompt uses seed `seed + j`, drawn from its own generator, so an image does not depend on how
the work was batched or on which other prompts ran with it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from ..errors import UserError
from ..models.embeddings import check_prompt_tokens
from ..resources import is_large, memory_savers
from .autocast import bf16_unet
from .compiled import compiled_unet
from .infotext import save_png, settings_for
from .loop import decode, denoise, initial_noise, latent_size, sampler
from .plain import PromptModel
from .schedulers import make_scheduler


@dataclass
class Generated:
    images: list[Image.Image]
    prompts: list[str]  # the prompt of each image
    seeds: list[int]  # the seed of each image
    paths: list[Path] = field(default_factory=list)
    grid_path: Path | None = None
    settings: list = field(default_factory=list)  # infotext.Settings of each image (written into its PNG)


def warn_truncated(tokenizer, prompts: list[str]) -> None:
    """Over-long prompts are cut to the text encoder's window (as diffusers does); say so once per prompt, on stderr."""
    import sys

    limit = tokenizer.model_max_length - 2  # BOS and EOS take two places
    for prompt in dict.fromkeys(prompts):
        n = len(tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False).input_ids)
        if n > limit:
            print(f"warning: prompt {prompt[:40]!r}... is {n} tokens; the model reads {limit}, so it is truncated "
                  "after that (shorten it to keep the end)", file=sys.stderr)


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def generate(
    pipe,
    prompts: list[str] | str,
    *,
    negative_prompt: str | None = None,
    seed: int = 0,
    num_images: int = 1,
    steps: int = 30,
    guidance_scale: float = 7.5,
    scheduler: str = "ddim",
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    progress: bool = True,
    low_memory: bool | None = None,
    procs=None,
    desc: str = "generate",
    bf16: bool = False,
    compile: bool = False,
    lora_end: float = 1.0,
) -> Generated:
    """Generate `num_images` images per prompt; with out_dir, write them as PNGs plus grid.png.

    low_memory: VAE tiling/slicing and one image per batch (attention slicing too where torch has no SDPA;
    conceptkit/resources.py); None turns them on for large images only (over 4x the model's native pixel count).
    The images' size is unchanged.

    procs (learn/distributed.Processes, several processes): each process makes its contiguous share of the
    prompt x seed list (same per-image seeds, so the same images), every process gets all of them back in order,
    and only the main one writes the files. desc: the progress bar's label.

    bf16 (generate/autocast.py) and compile (generate/compiled.py): opt-in speed-ups of the UNet; off, the images
    are exactly those of a run without them. lora_end: the loaded LoRAs' UNet layers act on this first share of the
    steps only (`--lora-end`, compose's rule)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("no prompt given: pass --prompt TEXT or --prompt-file FILE")
    check_prompt_tokens(pipe.tokenizer, prompts + ([negative_prompt] if negative_prompt else []))
    warn_truncated(pipe.tokenizer, prompts + ([negative_prompt] if negative_prompt else []))
    latent_hw = latent_size(pipe, height, width)
    height, width = (side * pipe.vae_scale_factor for side in latent_hw)
    low_memory = is_large(pipe, height, width) if low_memory is None else low_memory
    batch_size = 1 if low_memory else batch_size
    make_scheduler(scheduler, pipe.scheduler.config)  # an unknown name fails before any work
    jobs = [(p, seed + j) for p in prompts for j in range(num_images)]
    images: list[Image.Image] = []
    several = procs is not None and procs.several
    mine = procs.split(jobs) if several else jobs
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    progress = progress and (not several or procs.main)
    bar = tqdm(total=len(batches) * steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)

    # compiled first, autocast around it: the other way round the compiled forward replaced the autocast one
    with memory_savers(pipe, low_memory), compiled_unet(pipe.unet, compile), bf16_unet(pipe.unet, bf16):
        for batch in batches:
            generators = [torch.Generator(device="cpu").manual_seed(s) for _, s in batch]
            model = PromptModel(pipe, [p for p, _ in batch], negative_prompt, guidance_scale, size=(height, width),
                                lora_end=lora_end, steps=steps)
            schedule = sampler(scheduler, pipe, steps)
            latents = initial_noise(pipe, generators, latent_hw, schedule)
            latents = denoise(model, latents, schedule, generators=generators, progress=bar)
            images.extend(decode(pipe, latents))
    bar.close()
    if several:
        images = procs.gather(images)
    result = Generated(images, [p for p, _ in jobs], [s for _, s in jobs])
    result.settings = [settings_for(pipe, p, seed=s, steps=steps, sampler=scheduler, cfg_scale=guidance_scale,
                                    image=img, negative_prompt=negative_prompt,
                                    **({"LoRA end": f"{lora_end:g}"} if lora_end != 1 else {}))
                       for (p, s), img in zip(jobs, images)]
    if out_dir is not None and (not several or procs.main):
        save(result, out_dir, columns=num_images)
    if several:
        if not procs.main and out_dir is not None:  # the paths the main process wrote
            result.paths = [Path(out_dir) / image_name(i, p, s) for i, (p, s) in enumerate(jobs)]
            result.grid_path = Path(out_dir) / "grid.png"
        procs.barrier()
    return result


def image_name(i: int, prompt: str, seed: int) -> str:
    return f"{i:03d}-{slug(prompt)}-s{seed}.png"


def save(result: Generated, out_dir: str | Path, columns: int) -> Generated:
    """Each image as a PNG recording its settings (`result.settings`, A1111's `parameters` chunk), plus grid.png
    (recording the first image's settings, as A1111's grids do)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = list(getattr(result, "settings", None) or []) or [None] * len(result.images)
    for i, (img, prompt, s) in enumerate(zip(result.images, result.prompts, result.seeds)):
        result.paths.append(save_png(img, out_dir / image_name(i, prompt, s), settings[i]))
    rows = (len(result.images) + columns - 1) // columns
    blank = Image.new("RGB", result.images[0].size)
    cells = result.images + [blank] * (rows * columns - len(result.images))
    grid = make_image_grid(cells, rows=rows, cols=columns)
    result.grid_path = save_png(grid, out_dir / "grid.png", settings[0])
    return result
