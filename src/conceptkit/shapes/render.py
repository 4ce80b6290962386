"""Render shapes-world scenes to 64x64 RGB arrays (4x supersampled, so edges are anti-aliased)."""
from __future__ import annotations

import math

import numpy as np

from .world import BACKGROUNDS, COLORS, IMAGE_SIZE, MARK_RGB, Scene, object_box

SUPERSAMPLE = 4


def _polygon_mask(u: np.ndarray, v: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the grid (u, v)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(pts)
    for i in range(n):
        (x1, y1), (x2, y2) = pts[i], pts[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        x_at = (x2 - x1) * (v - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= crosses & (u < x_at)
    return inside


def _star_points() -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((r * math.cos(a), r * math.sin(a) + 0.1))  # +0.1 centres the star's box vertically
    return pts


_STAR = _star_points()
_TRIANGLE = [(0.0, -0.95), (0.95, 0.8), (-0.95, 0.8)]


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape in unit box coordinates (u, v in [-1, 1], v pointing down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "triangle":
        return _polygon_mask(u, v, _TRIANGLE)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.34) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.34) & (np.abs(u) <= 1.0))
    if shape == "star":
        return _polygon_mask(u, v, _STAR)
    if shape == "moon":
        return (u * u + v * v <= 1.0) & ((u - 0.55) ** 2 + (v + 0.2) ** 2 > 0.72**2)
    raise ValueError(f"unknown shape {shape!r}")


def pattern_mask(pattern: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where the dark marks go, in pixel offsets (dx, dy) from the object's centre.

    Object centres sit on integer pixel corners, so mark edges fall on pixel edges (no half-covered pixels)."""
    if pattern == "plain":
        return np.zeros(dx.shape, dtype=bool)
    if pattern == "striped":  # horizontal stripes, 5 px dark / 5 px light
        return np.floor(dy / 5.0) % 2 == 1
    if pattern == "dotted":  # dots of diameter 5 px on a 9 px grid
        gx = dx - 0.5 - 9.0 * np.round((dx - 0.5) / 9.0)
        gy = dy - 0.5 - 9.0 * np.round((dy - 0.5) / 9.0)
        return gx * gx + gy * gy <= 2.5**2
    if pattern == "checkered":  # 5 px cells
        return (np.floor(dx / 5.0) + np.floor(dy / 5.0)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


_FINE = (np.arange(IMAGE_SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # fine-grid pixel centres in coarse pixel units
_FX, _FY = np.meshgrid(_FINE, _FINE)


def _window(centre: float, side: float) -> slice:
    lo = max(0, int((centre - side / 2 - 1) * SUPERSAMPLE))
    hi = min(IMAGE_SIZE * SUPERSAMPLE, int((centre + side / 2 + 1) * SUPERSAMPLE) + 1)
    return slice(lo, hi)


def _pool(fine: np.ndarray) -> np.ndarray:
    s = SUPERSAMPLE
    h, w = fine.shape[0] // s, fine.shape[1] // s
    return fine.reshape(h, s, w, s, *fine.shape[2:]).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """The scene as a (64, 64, 3) uint8 array."""
    img = np.empty(_FX.shape + (3,), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    offsets = scene.offsets or tuple((0, 0) for _ in scene.objects)
    for obj, off in zip(scene.objects, offsets):
        cx, cy, side = object_box(obj, off)
        # only the fine-grid window around the object's box is evaluated
        ys, xs = _window(cy, side), _window(cx, side)
        fx, fy = _FX[ys, xs], _FY[ys, xs]
        inside = shape_mask(obj.shape, (fx - cx) / (side / 2), (fy - cy) / (side / 2))
        marks = pattern_mask(obj.pattern, fx - cx, fy - cy) & inside
        window = img[ys, xs]
        window[inside] = COLORS[obj.color]
        window[marks] = MARK_RGB
    return np.clip(np.round(_pool(img)), 0, 255).astype(np.uint8)
