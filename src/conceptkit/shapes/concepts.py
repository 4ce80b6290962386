"""Concept sets for personalization: a few rendered images of one object, the way users bring 3-5 photos.

Each set shows one (shape, colour, pattern) at four backgrounds, positions and both sizes, so a learned word
has to capture the object and not its surroundings. Two sets use shapes the base model's captions never name
(a learned word is the only way to ask for them); the others use held-out shape/colour/pattern combinations that
no training image shows. The sets are rendered deterministically and also shipped as PNGs in
`bundled/concepts/<name>/` (a test checks the two agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

import conceptkit

from .captions import shape_word
from .render import render
from .world import UNNAMED_SHAPES, Obj, Scene

VIEWS = (("gray", "center", "large", (1, -1)), ("navy", "left", "small", (0, 2)), ("teal", "right", "large", (-2, 0)),
         ("white", "top", "small", (2, 1)))


@dataclass(frozen=True)
class Concept:
    name: str
    shape: str
    color: str
    pattern: str

    @property
    def description(self) -> str:
        """The best plain-text description the base model's vocabulary allows ('red striped object')."""
        return f"{self.color} {self.pattern} {shape_word(self.shape)}"

    @property
    def named(self) -> bool:
        return self.shape not in UNNAMED_SHAPES

    def scenes(self) -> list[Scene]:
        return [Scene(bg, (Obj(self.shape, self.color, self.pattern, pos, size),), (offset,))
                for bg, pos, size, offset in VIEWS]

    def images(self) -> list[Image.Image]:
        return [Image.fromarray(render(s)) for s in self.scenes()]


CONCEPTS = (
    Concept("red-striped-star", "star", "red", "striped"),
    Concept("cyan-dotted-moon", "moon", "cyan", "dotted"),
    Concept("pink-checkered-cross", "cross", "pink", "checkered"),
    Concept("purple-dotted-diamond", "diamond", "purple", "dotted"),
)


# Concepts for composing two LoRAs in one image (`evaluate clora`). Every shape is named, so each concept has a
# class word of its own ("a z circle on the left and a square on the right"); within a split the four concepts
# differ pairwise in shape, colour *and* pattern, so an object drawn with another concept's colour or pattern (what
# merging LoRAs does) is visible to the oracle. All are held-out triples (world.HELD_OUT_TRIPLES): the base model
# never saw them, so it cannot draw them from the class word. The tune concepts only choose the LoRA recipe and
# the CLoRA settings; every reported figure uses the test concepts.
COMPOSE_TUNE = (
    Concept("blue-checkered-diamond", "diamond", "blue", "checkered"),
    Concept("green-striped-circle", "circle", "green", "striped"),
    Concept("orange-dotted-triangle", "triangle", "orange", "dotted"),
    Concept("purple-plain-cross", "cross", "purple", "plain"),
)
COMPOSE_TEST = (
    Concept("yellow-checkered-circle", "circle", "yellow", "checkered"),
    Concept("blue-plain-square", "square", "blue", "plain"),
    Concept("red-striped-triangle", "triangle", "red", "striped"),
    Concept("pink-dotted-cross", "cross", "pink", "dotted"),
)


def bundled_concepts_path() -> Path:
    return Path(conceptkit.__file__).parent / "bundled" / "concepts"


def concept_folder(concept: Concept) -> Path:
    return bundled_concepts_path() / concept.name


def write_concept(concept: Concept, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from ..generate.infotext import rendered, save_png

    for i, scene in enumerate(concept.scenes()):
        save_png(Image.fromarray(render(scene)), folder / f"{i}.png", rendered(scene))
    return folder


def by_name(name: str) -> Concept:
    for c in CONCEPTS:
        if c.name == name:
            return c
    raise KeyError(name)
