"""Plain text-to-image generation: prompts x seeds through the model's pipeline, PNGs plus a grid.

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
from ..files import atomic_write
from ..models.embeddings import check_prompt_tokens
from .schedulers import make_scheduler


@dataclass
class Generated:
    images: list[Image.Image]
    prompts: list[str]  # the prompt of each image
    seeds: list[int]  # the seed of each image
    paths: list[Path] = field(default_factory=list)
    grid_path: Path | None = None


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist: pass a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text: save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompt: write one prompt per line")
    return prompts


def default_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


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
) -> Generated:
    """Generate `num_images` images per prompt; with out_dir, write them as PNGs plus grid.png."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("no prompt given: pass --prompt TEXT or --prompt-file FILE")
    check_prompt_tokens(pipe.tokenizer, prompts + ([negative_prompt] if negative_prompt else []))
    size = default_size(pipe)
    height, width = height or size, width or size
    multiple = pipe.vae_scale_factor
    if height % multiple or width % multiple:
        raise UserError(f"size {width}x{height} is not a multiple of {multiple}: pass --width/--height divisible by {multiple}")
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    jobs = [(p, seed + j) for p in prompts for j in range(num_images)]
    images: list[Image.Image] = []
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    bar = tqdm(total=len(batches) * steps, desc="generate", unit="step", disable=not progress, dynamic_ncols=True)

    def advance(_pipe, _i, _t, kwargs):
        bar.update(1)
        return kwargs

    for batch in batches:
        generators = [torch.Generator(device="cpu").manual_seed(s) for _, s in batch]
        out = pipe(
            prompt=[p for p, _ in batch],
            negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generators,
            callback_on_step_end=advance,
        )
        images.extend(out.images)
    bar.close()
    result = Generated(images, [p for p, _ in jobs], [s for _, s in jobs])
    if out_dir is not None:
        save(result, out_dir, columns=num_images)
    return result


def save(result: Generated, out_dir: str | Path, columns: int) -> Generated:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (img, prompt, s) in enumerate(zip(result.images, result.prompts, result.seeds)):
        path = out_dir / f"{i:03d}-{slug(prompt)}-s{s}.png"
        atomic_write(path, lambda p, img=img: img.save(p, format="PNG"))
        result.paths.append(path)
    rows = (len(result.images) + columns - 1) // columns
    blank = Image.new("RGB", result.images[0].size)
    cells = result.images + [blank] * (rows * columns - len(result.images))
    grid = make_image_grid(cells, rows=rows, cols=columns)
    result.grid_path = atomic_write(out_dir / "grid.png", lambda p: grid.save(p, format="PNG"))
    return result
