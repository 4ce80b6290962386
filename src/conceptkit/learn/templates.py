"""Textual Inversion's caption templates (ALGORITHMS.md §1.3); `{}` is replaced by the placeholder string."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

# diffusers' examples/textual_inversion (27)
OBJECT = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
# the official repo's personalized.py (81): the 27, then with "a photo of" -> "an illustration of", then
# -> "a depiction of"; templates without that phrase repeat unchanged (intended: it raises their weight).
OBJECT_81 = OBJECT + tuple(t.replace("a photo of", "an illustration of") for t in OBJECT) + tuple(
    t.replace("a photo of", "a depiction of") for t in OBJECT)
STYLE = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)
NAMED = {"object": OBJECT, "object81": OBJECT_81, "style": STYLE}


def _formats(line: str) -> bool:
    """The line takes the placeholder with str.format (other braces, e.g. '{x}' or a lone '{', would break it)."""
    try:
        line.format("S")
    except (ValueError, KeyError, IndexError, AttributeError):
        return False
    return True


def load_templates(spec: str) -> tuple[str, ...]:
    """'object' (27), 'object81' (the official repo's 81), 'style' (19), or a text file with one template a line."""
    if spec in NAMED:
        return NAMED[spec]
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"template {spec!r} is neither {', '.join(NAMED)} nor a file: pass one of those or a text "
                        "file with one template per line containing {{}}")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"template file {path} is not UTF-8 text: save it as UTF-8") from None
    bad = [line for line in lines if line.count("{}") != 1 or not _formats(line)]
    if not lines or bad:
        raise UserError(f"template file {path}: every line needs exactly one {{}} for the placeholder "
                        f"(bad: {bad[:2] if bad else 'no lines'})")
    return tuple(lines)
