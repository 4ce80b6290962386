"""The shapes world: its attribute vocabulary, scene sampling and the fixed held-out splits.

A scene is a flat background colour with one object (any of five positions, two sizes) or two objects
(one on the left, one on the right, medium size). Every object has a shape, a colour and a pattern.
Two shapes (`star`, `moon`) appear in images but are never named in captions: they are called "object",
so Textual Inversion has to discover words for them.

Held-out splits (documented in the README and fixed forever, so figures stay comparable):
- HELD_OUT_TRIPLES: (shape, colour, pattern) combinations that never appear in any training image.
  Every pair inside a held-out triple still appears in training, so they test composition, not new words.
- Seeds: training scenes are drawn from seeds < EVAL_SEED_BASE; evaluation sampling seeds start at EVAL_SEED_BASE.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field, asdict

# Object colours (RGB). No object is white, gray or dark, so the pattern marks (near black)
# and every background stay distinguishable from every object colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 190, 60),
    "cyan": (40, 215, 225),
    "blue": (45, 85, 235),
    "purple": (150, 55, 205),
    "pink": (250, 130, 195),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "navy": (28, 38, 112),
    "brown": (118, 78, 40),
    "teal": (22, 108, 108),
    "white": (240, 240, 240),
}
MARK_RGB = (22, 22, 22)  # colour of stripes, dots and checks

NAMED_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
UNNAMED_SHAPES = ("star", "moon")  # rendered, never named: captions call them "object"
SHAPES = NAMED_SHAPES + UNNAMED_SHAPES
PATTERNS = ("plain", "striped", "dotted", "checkered")
SIZES: dict[str, int] = {"small": 20, "large": 30}  # side of the object's square box, pixels
PAIR_SIZE = 24  # objects in two-object scenes
POSITIONS: dict[str, tuple[int, int]] = {  # anchor (x, y) of the object's centre on a 64x64 canvas
    "center": (32, 32),
    "left": (16, 32),
    "right": (48, 32),
    "top": (32, 16),
    "bottom": (32, 48),
}
IMAGE_SIZE = 64
JITTER = 2  # +- pixels around the anchor
EVAL_SEED_BASE = 1_000_000


def _held_out_triples() -> tuple[tuple[str, str, str], ...]:
    """A fixed ~15% of named (shape, colour, pattern) triples, chosen so every pair stays in training."""
    rng = random.Random(20261121)
    triples = list(itertools.product(NAMED_SHAPES, COLORS, PATTERNS))
    rng.shuffle(triples)
    held, remaining = [], set(triples)
    for t in triples:
        if len(held) >= 24:
            break
        trial = remaining - {t}
        pairs_ok = all(
            any(
                (u[i], u[j]) == (t[i], t[j]) for u in trial
            )
            for i, j in ((0, 1), (0, 2), (1, 2))
        )
        if pairs_ok:
            held.append(t)
            remaining = trial
    return tuple(sorted(held))


HELD_OUT_TRIPLES = _held_out_triples()
_HELD = set(HELD_OUT_TRIPLES)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    pattern: str
    position: str
    size: str = "small"

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.shape, self.color, self.pattern)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]
    # pixel jitter of each object's centre, and the pattern phase; part of the scene so renders are exact
    offsets: tuple[tuple[int, int], ...] = field(default=())

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(d["background"], tuple(Obj(**o) for o in d["objects"]), tuple(tuple(x) for x in d.get("offsets", ())))


def is_held_out(obj: Obj) -> bool:
    return obj.triple in _HELD


def _random_obj(rng: random.Random, position: str, size: str, held_out: bool) -> Obj:
    while True:
        o = Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(PATTERNS), position, size)
        if is_held_out(o) == held_out:
            return o


def sample_scene(rng: random.Random, p_pair: float = 0.4, held_out: bool = False) -> Scene:
    """A random training scene (or, with held_out=True, one whose objects use held-out triples)."""
    bg = rng.choice(list(BACKGROUNDS))
    if rng.random() < p_pair:
        objs = (_random_obj(rng, "left", "medium", held_out), _random_obj(rng, "right", "medium", held_out))
    else:
        objs = (_random_obj(rng, rng.choice(list(POSITIONS)), rng.choice(list(SIZES)), held_out),)
    offsets = tuple((rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)) for _ in objs)
    return Scene(bg, objs, offsets)


def object_box(obj: Obj, offset: tuple[int, int] = (0, 0)) -> tuple[float, float, float]:
    """(centre x, centre y, side) of the object's square box in pixels."""
    side = PAIR_SIZE if obj.size == "medium" else SIZES[obj.size]
    ax, ay = POSITIONS[obj.position]
    return ax + offset[0], ay + offset[1], side
