"""The caption grammar: varied phrasings of a scene, and the closed vocabulary the bundled tokenizer knows.

Unnamed shapes (world.UNNAMED_SHAPES) are always written "object". Patterns are written as an adjective
("striped") or a "with ..." phrase ("with stripes"); "plain" is sometimes said, sometimes left out.
"""
from __future__ import annotations

import random

from .world import BACKGROUNDS, COLORS, NAMED_SHAPES, PATTERNS, SIZES, Obj, Scene

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PATTERN_NOUNS = {"striped": "stripes", "dotted": "dots", "checkered": "checks"}
# Openings borrowed from Textual Inversion's object templates, so those words mean something to the base model.
OPENINGS = (
    "", "", "", "a photo of ", "a rendering of ", "a picture of ", "a good photo of ", "a close-up photo of ",
    "a cropped photo of ", "an illustration of ", "a depiction of ", "a rendition of ",
)
EXTRA_WORDS = (
    "the photo of my one clean dirty dark bright cool nice weird painting in style image scene close up"
).split()


def shape_word(shape: str) -> str:
    return shape if shape in NAMED_SHAPES else "object"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: Obj, rng: random.Random | None = None, with_size: bool = True, with_pattern: bool = True,
                  with_position: bool = True) -> str:
    """'a large red striped circle on the left' (or a varied phrasing when rng is given)."""
    words = []
    if with_size and obj.size in SIZES:
        words.append(obj.size)
    words.append(obj.color)
    pattern_after = False
    if with_pattern and obj.pattern != "plain":
        if rng is not None and rng.random() < 0.3:
            pattern_after = True
        else:
            words.append(obj.pattern)
    elif with_pattern and obj.pattern == "plain" and (rng is None or rng.random() < 0.5):
        words.append("plain")
    words.append(shape_word(obj.shape))
    if pattern_after:
        words += ["with", PATTERN_NOUNS[obj.pattern]]
    if with_position:
        words.append(POSITION_PHRASES[obj.position])
    text = " ".join(words)
    return f"{article(text)} {text}"


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A caption for the scene. rng=None gives the canonical phrasing (used for evaluation prompts)."""
    if rng is None:
        parts = [object_phrase(o) for o in scene.objects]
        return " and ".join(parts) + f", on a {scene.background} background"
    drop = lambda p: rng.random() < p  # noqa: E731 - attribute dropout keeps partial prompts meaningful
    single = len(scene.objects) == 1
    parts = [
        object_phrase(o, rng, with_size=not drop(0.3), with_pattern=True, with_position=not (single and drop(0.15)))
        for o in scene.objects
    ]
    if not single and rng.random() < 0.5:
        parts = parts[::-1]
    body = " and ".join(parts)
    opening = rng.choice(OPENINGS)
    if opening:
        body = opening + body
    if drop(0.1):
        return body
    if rng.random() < 0.2:
        return f"{scene.background} background with {body}"
    return f"{body}, on a {scene.background} background"


def placeholder_caption(scene: Scene, placeholder: str = "S*", which: int | None = None) -> str:
    """The scene's caption with one object replaced by the placeholder, in the form the evaluation's prompts use
    (evaluate/ti.py COMPOSITIONAL, evaluate/profusion.py bench_prompts): 'a large S* on the left, on a brown
    background' (the size word only for the sizes captions name); in a two-object scene `which` names the object
    the placeholder stands for, and the other is written out, left object first: 'a S* on the left and a red
    striped circle on the right, on a white background'."""
    if which is None:
        if len(scene.objects) != 1:
            raise ValueError(f"a scene with {len(scene.objects)} objects: name the object the placeholder stands for")
        which = 0
    if not 0 <= which < len(scene.objects):
        raise ValueError(f"object {which} of a scene with {len(scene.objects)} objects")
    parts = []
    left_first = sorted(range(len(scene.objects)), key=lambda i: scene.objects[i].position != "left")
    for i in left_first:
        obj = scene.objects[i]
        if i != which:
            parts.append(object_phrase(obj))
            continue
        size = f"{obj.size} " if obj.size in SIZES else ""
        parts.append(f"a {size}{placeholder} {POSITION_PHRASES[obj.position]}")
    return " and ".join(parts) + f", on a {scene.background} background"


def vocabulary() -> list[str]:
    """Every word the caption grammar (and the TI templates it borrows) can produce."""
    words = set()
    for o in OPENINGS:
        words.update(o.split())
    for p in POSITION_PHRASES.values():
        words.update(p.split())
    words.update(COLORS, BACKGROUNDS, NAMED_SHAPES, PATTERNS, SIZES, PATTERN_NOUNS.values(), EXTRA_WORDS)
    words.update(["a", "an", "and", "with", "background", "object", "on", "of"])
    return sorted(words)
