"""A concept's training images: read a folder, check it, and turn it into [-1, 1] tensors (ALGORITHMS.md §1.4)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

# Files that commonly sit next to training images and are not images: skipped, not refused.
SIDECAR_SUFFIXES = {".txt", ".json", ".jsonl", ".md", ".caption", ".csv", ".yaml", ".yml"}


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        raise UserError(f"--images {folder} is a file, not a folder: pass the folder that holds the 3-5 images "
                        f"(e.g. --images {folder.parent})")
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist: pass --images DIR, a folder of 3-5 images of the concept")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() not in SIDECAR_SUFFIXES)
    if not files:
        raise UserError(f"image folder {folder} holds no images: put 3-5 .png/.jpg images of the concept in it")
    return files


def _as_rgb(im: Image.Image) -> Image.Image:
    """Any mode → RGB: EXIF orientation applied; 16/32-bit integer and float grey scaled to 8 bits (PIL's own
    convert clips them, turning a 16-bit image white); transparency composited over white; CMYK, palette, 1-bit as
    PIL converts them. An animated file gives its first frame."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        top = 1.0 if im.mode == "F" and array.max(initial=0) <= 1.0 else top
        im = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _open_rgb(path: Path) -> Image.Image | None:
    """The image as RGB (see _as_rgb), or None if it cannot be read as an image; one that is too large to open
    safely (PIL's decompression-bomb limit) is refused."""
    try:
        with Image.open(path) as im:
            im.load()
            return _as_rgb(im)
    except Image.DecompressionBombError:
        raise UserError(f"{path}: too large to open safely (over {Image.MAX_IMAGE_PIXELS * 2 / 1e6:.0f} megapixels, "
                        "Pillow's decompression-bomb limit): downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _center_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def load_images(folder: str | Path, resolution: int, center_crop: bool = False) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1]. Like both reference codes: RGB, bicubic resize, squashed unless center_crop."""
    return read_images(image_files(folder), resolution, center_crop, where=Path(folder))


def read_images(files: list[Path], resolution: int, center_crop: bool = False, *, where: Path) -> torch.Tensor:
    """load_images for a list of files (errors name `where`, their folder)."""
    images, unreadable, small = [], [], []
    for path in files:
        image = _open_rgb(path)
        if image is None:
            unreadable.append(path.name)
            continue
        if min(image.size) < resolution:
            small.append(f"{path.name} ({image.width}x{image.height})")
        images.append(image)
    if unreadable:
        raise UserError(f"{where}: cannot read {', '.join(unreadable)} as images (corrupt or not an image): "
                        "remove or replace them")
    if small:
        raise UserError(f"{where}: {', '.join(small)} smaller than the training resolution {resolution}: pass "
                        f"--resolution {min(min(im.size) for im in images)} or larger images")
    return torch.stack([_to_tensor((_center_square(im) if center_crop else im).resize(
        (resolution, resolution), Image.Resampling.BICUBIC)) for im in images])


def check_image_files(files: list[Path], resolution: int, *, where: Path) -> None:
    """What read_images refuses (unreadable files, a side below `resolution`), from the files' headers only: for
    training that reads its images at every step (random crops) instead of once."""
    unreadable, small = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                width, height = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that turn it by 90° (_as_rgb)
                    width, height = height, width
        except Image.DecompressionBombError:
            raise UserError(f"{path}: too large to open safely (Pillow's decompression-bomb limit): downscale it "
                            "first") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            unreadable.append(path.name)
            continue
        if min(width, height) < resolution:
            small.append(f"{path.name} ({width}x{height})")
    if unreadable:
        raise UserError(f"{where}: cannot read {', '.join(unreadable)} as images (corrupt or not an image): "
                        "remove or replace them")
    if small:
        raise UserError(f"{where}: {', '.join(small)} smaller than the training resolution {resolution}: pass a "
                        "smaller --resolution or larger images")


def random_crop(path: Path, resolution: int, g: torch.Generator) -> torch.Tensor:
    """(3, R, R) in [-1, 1]: the image resized so that its shorter side is R (bicubic, as read_images), then an R x R
    window at an offset drawn from `g` (the official pre-training's Resize + RandomCrop; a square image has one)."""
    image = _open_rgb(path)
    if image is None:
        raise UserError(f"cannot read {path} as an image (corrupt or not an image): remove or replace it")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.BICUBIC)
    left = int(torch.randint(0, size[0] - resolution + 1, (), generator=g))
    top = int(torch.randint(0, size[1] - resolution + 1, (), generator=g))
    return _to_tensor(resized.crop((left, top, left + resolution, top + resolution)))


def load_reference_image(path: str | Path, resolution: int) -> torch.Tensor:
    """(1, 3, R, R) in [-1, 1]: one image, center-cropped to a square and resized with LANCZOS (ProFusion, §3.1)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"image {path} is a folder, not an image file: pass --image FILE, a .png/.jpg of the concept")
    if not path.is_file():
        raise UserError(f"image {path} does not exist: pass --image FILE, a .png/.jpg of the concept")
    image = _open_rgb(path)
    if image is None:
        raise UserError(f"cannot read {path} as an image (corrupt or not an image): pass a .png or .jpg")
    return _to_tensor(_center_square(image).resize((resolution, resolution), Image.Resampling.LANCZOS))[None]


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → a PIL image."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(array.numpy())
