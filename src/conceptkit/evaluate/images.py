"""`conceptkit evaluate images`: CLIP-I, CLIP-T and DINO of a folder of generated images against a folder of real
ones (definitions and preprocessing: similarity.py). Each image's prompt, for CLIP-T, is `prompt=` when given, else
the one its PNG records (AUTOMATIC1111's `parameters` chunk, which every image conceptkit writes carries:
generate/infotext.py), else none, and then its CLIP-T is null."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..generate.infotext import read_prompt
from .similarity import ClipScorer, DinoScorer, score, summarise

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_paths(folder: str | Path, option: str) -> list[Path]:
    """The image files directly in `folder` (sorted; grid.png, which `generate` writes beside the images, left
    out), or a one-line error."""
    folder = Path(folder)
    if folder.is_file():
        raise UserError(f"{option} {folder} is a file, not a folder: pass the folder that holds the images")
    if not folder.is_dir():
        raise UserError(f"{option} {folder} does not exist: pass a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(".") and p.name != "grid.png")
    if not files:
        raise UserError(f"{option} {folder} holds no images (.png/.jpg/.webp): put the images to score in it")
    return files


def read_rgb(files: list[Path], option: str) -> list:
    """The images as RGB (learn/images.py's reading: EXIF orientation, transparency over white), or one line naming
    the unreadable ones."""
    from ..learn.images import _open_rgb

    images, bad = [], []
    for path in files:
        image = _open_rgb(path)
        (bad.append(path.name) if image is None else images.append(image))
    if bad:
        raise UserError(f"{option} {files[0].parent}: cannot read {', '.join(bad)} as images (corrupt or not an "
                        "image): remove or replace them")
    return images


def load_scorers(clip: str | None, dino: str | None, device: str = "cpu") -> tuple[ClipScorer | None,
                                                                                    DinoScorer | None]:
    if not clip and not dino:
        raise UserError("no scoring model: pass --clip FOLDER (CLIP-I, CLIP-T) and/or --dino FOLDER (DINO)")
    return (ClipScorer(clip, device) if clip else None), (DinoScorer(dino, device) if dino else None)


def evaluate_images(images: str | Path, reference: str | Path, *, prompt: str | None = None,
                    clip: str | ClipScorer | None = None, dino: str | DinoScorer | None = None,
                    batch_size: int = 16, device: str = "cpu", progress: bool = True) -> dict:
    """Score every image in `images` against every image in `reference`.

    Returns {"images": [{"file", "prompt", "prompt_from", "clip_i", "clip_t", "dino"}, ...],
    "means": {"clip_i"|"clip_t"|"dino": {"mean", "se", "n"}}, "settings": {...}}; a metric whose model was not
    given is null, and so is CLIP-T for an image whose prompt is unknown."""
    generated_files = image_paths(images, "--images")
    reference_files = image_paths(reference, "--reference")
    # a str/path is a model to load; anything else is an encoder already made (images(list) -> (N, d) tensor)
    clip_scorer = ClipScorer(clip, device) if isinstance(clip, (str, os.PathLike)) and clip else clip or None
    dino_scorer = DinoScorer(dino, device) if isinstance(dino, (str, os.PathLike)) and dino else dino or None
    if clip_scorer is None and dino_scorer is None:
        load_scorers(None, None)  # the one-line error
    generated = read_rgb(generated_files, "--images")
    references = read_rgb(reference_files, "--reference")
    prompts, sources = [], []
    for path in generated_files:
        recorded = None if prompt else _recorded_prompt(path)
        prompts.append(prompt or recorded)
        sources.append("--prompt" if prompt else "recorded" if recorded else None)
    rows = score(generated, prompts, references, clip=clip_scorer, dino=dino_scorer, batch_size=batch_size,
                 progress=progress)
    table = [{"file": path.name, "prompt": p, "prompt_from": source, **row}
             for path, p, source, row in zip(generated_files, prompts, sources, rows)]
    return {"kind": "images", "images": table, "means": summarise(table),
            "settings": {"images": str(images), "reference": str(reference), "references": len(references),
                         "prompt": prompt, "clip": getattr(clip_scorer, "name", None),
                         "dino": getattr(dino_scorer, "name", None),
                         "definitions": "mean over generated x reference pairs of the cosine of L2-normalised "
                                        "embeddings (CLIP: get_image_features; DINO: last layer's CLS token); "
                                        "CLIP-T: cosine of image and prompt embeddings (get_text_features)"}}


def _recorded_prompt(path: Path) -> str | None:
    try:
        return read_prompt(path)
    except OSError:
        return None


def fmt(summary: dict) -> str:
    if summary["mean"] is None:
        return "—"
    se = f" ± {summary['se']:.3f}" if summary["se"] is not None else ""
    return f"{summary['mean']:.3f}{se}"


def table(result: dict) -> str:
    """The means as the papers print them (± standard error), then the count of images."""
    m = result["means"]
    n = len(result["images"])
    return "\n".join(["| images | references | CLIP-I | CLIP-T | DINO |", "|---|---|---|---|---|",
                      f"| {n} | {result['settings']['references']} | {fmt(m['clip_i'])} | {fmt(m['clip_t'])} | "
                      f"{fmt(m['dino'])} |"])
