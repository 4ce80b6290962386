"""The oracle: read a 64x64 shapes-world image back into attributes.

Deterministic image analysis, no learning, so its errors are explainable:
1. background = median colour of the 1-pixel border, named by the nearest background colour;
2. foreground = pixels far from that colour; holes filled; connected components of >= MIN_AREA pixels are objects
   (the two largest are kept);
3. shape = the template (every shape of the world, stretched onto the component's bounding box) with the best IoU;
4. colour = nearest object colour to the median of the component's bright pixels;
5. pattern = from the dark marks inside the eroded component: how many, and whether they form rows (stripes);
6. position = nearest anchor of the object's centroid; size = small/large by the box side.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import numpy as np
from scipy import ndimage

from .render import shape_mask
from .world import BACKGROUNDS, COLORS, MARK_RGB, POSITIONS, SHAPES, SIZES

FG_THRESHOLD = 55.0  # RGB distance from the background that counts as foreground
MIN_AREA = 30
_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float32)
_COLOR_NAMES = list(COLORS)
_COLOR_RGB = np.array([COLORS[n] for n in _COLOR_NAMES], dtype=np.float32)
_MARK = np.array(MARK_RGB, dtype=np.float32)


@dataclass
class ReadObject:
    shape: str
    color: str
    pattern: str
    position: str
    size: str
    centroid: tuple[float, float]
    area: int


@dataclass
class Reading:
    background: str
    objects: list[ReadObject]

    @property
    def count(self) -> int:
        return len(self.objects)

    def to_dict(self) -> dict:
        return asdict(self)


def _nearest(rgb: np.ndarray, table: np.ndarray, names: list[str]) -> str:
    return names[int(np.argmin(((table - rgb) ** 2).sum(-1)))]


def _template(shape: str, box: tuple[int, int, int, int], hw: tuple[int, int]) -> np.ndarray:
    """The shape's silhouette stretched so that its tight box fills `box` = (y0, x0, y1, x1), exclusive ends."""
    y0, x0, y1, x1 = box
    # tight box of the shape in unit coordinates, measured once on a fine grid
    u0, v0, u1, v1 = _TIGHT[shape]
    ys, xs = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32) + 0.5
    u = u0 + (xs - x0) / max(x1 - x0, 1) * (u1 - u0)
    v = v0 + (ys - y0) / max(y1 - y0, 1) * (v1 - v0)
    return shape_mask(shape, u, v)


def _tight_boxes() -> dict[str, tuple[float, float, float, float]]:
    g = np.linspace(-1.2, 1.2, 961)
    u, v = np.meshgrid(g, g)
    out = {}
    for s in SHAPES:
        m = shape_mask(s, u, v)
        uu, vv = u[m], v[m]
        step = g[1] - g[0]
        out[s] = (uu.min() - step / 2, vv.min() - step / 2, uu.max() + step / 2, vv.max() + step / 2)
    return out


_TIGHT = _tight_boxes()


def classify_shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    best, best_iou = SHAPES[0], -1.0
    for s in SHAPES:
        t = _template(s, box, mask.shape)
        iou = (t & mask).sum() / max((t | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = s, iou
    return best


def classify_color(img: np.ndarray, mask: np.ndarray) -> str:
    """Majority vote of the inner pixels' nearest palette colours, marks excluded."""
    inner = ndimage.binary_erosion(mask, iterations=1)
    px = img[inner if inner.sum() >= 6 else mask]
    palette = np.concatenate([_COLOR_RGB, _MARK[None]])
    nearest = np.argmin(((px[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    votes = np.bincount(nearest, minlength=len(palette))[: len(_COLOR_NAMES)]
    if votes.sum() == 0:  # all marks: fall back to the brightest pixels
        return _nearest(px[px.mean(-1).argmax()], _COLOR_RGB, _COLOR_NAMES)
    return _COLOR_NAMES[int(votes.argmax())]


def classify_pattern(img: np.ndarray, mask: np.ndarray, color_rgb: np.ndarray) -> str:
    inner = ndimage.binary_erosion(mask, iterations=1)
    if inner.sum() < 12:
        inner = mask
    px = img[inner]
    # a pixel is a mark when it is nearer the mark colour than the object colour
    dark = ((px - _MARK) ** 2).sum(-1) < ((px - color_rgb) ** 2).sum(-1)
    frac = dark.mean()
    if frac < 0.08:
        return "plain"
    d = np.zeros(mask.shape, dtype=np.float32)
    d[inner] = dark
    rows = inner.sum(1) >= 3
    cols = inner.sum(0) >= 3
    row_means = d.sum(1)[rows] / inner.sum(1)[rows]
    col_means = d.sum(0)[cols] / inner.sum(0)[cols]
    total_var = frac * (1 - frac)
    row_share = row_means.var() / total_var if total_var > 0 else 0.0
    col_share = col_means.var() / total_var if total_var > 0 else 0.0
    if row_share > 0.45 and row_share > 3 * col_share:
        return "striped"
    # dots are isolated blobs; checks touch at their corners and merge into large 8-connected regions
    labels, n = ndimage.label(d > 0, structure=np.ones((3, 3)))
    largest = np.bincount(labels[labels > 0]).max() if n else 0
    if frac > 0.44 or (frac > 0.3 and largest > 40):
        return "checkered"
    return "dotted"


def read(image) -> Reading:
    """Read a shapes-world image (PIL image or HxWx3 uint8 array; resized to 64x64 if needed)."""
    img = np.asarray(image.convert("RGB").resize((64, 64)) if hasattr(image, "convert") else image).astype(np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, _BG_RGB, _BG_NAMES)
    fg = np.sqrt(((img - bg_rgb) ** 2).sum(-1)) > FG_THRESHOLD
    fg = ndimage.binary_fill_holes(fg)
    labels, n = ndimage.label(fg)
    comps = []
    for i in range(1, n + 1):
        m = labels == i
        if m.sum() >= MIN_AREA:
            comps.append(m)
    comps = sorted(comps, key=lambda m: -m.sum())[:2]
    objects = []
    for m in comps:
        color = classify_color(img, m)
        ys, xs = np.nonzero(m)
        cy, cx = ys.mean(), xs.mean()
        side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
        size = "small" if side < (SIZES["small"] + SIZES["large"]) / 2 else "large"
        objects.append(ReadObject(
            shape=classify_shape(m),
            color=color,
            pattern=classify_pattern(img, m, _COLOR_RGB[_COLOR_NAMES.index(color)]),
            position=position,
            size=size,
            centroid=(float(cx), float(cy)),
            area=int(m.sum()),
        ))
    objects.sort(key=lambda o: o.centroid[0])  # left to right
    return Reading(background, objects)
