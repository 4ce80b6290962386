"""The malformed-input corpus (tests/bad_inputs/): every case ends in a one-line error (exit code 2, no traceback,
naming the input) or in its documented graceful handling; no pickle runs code; --out keeps what the user had."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "bad_inputs"))
import bad_inputs_runner as runner  # noqa: E402

from conceptkit.learn.images import _open_rgb  # noqa: E402

IMAGES = runner.FILES / "images"
REFERENCE = Path(__file__).parents[1] / "src/conceptkit/bundled/concepts/red-striped-star/0.png"


@pytest.fixture(scope="module")
def toy_pipeline_cache():
    with runner.cached_toy_pipeline():
        yield


def test_corpus_size_and_kinds():
    files = [p for p in runner.FILES.rglob("*") if p.is_file()]
    assert len(runner.CASES) >= 40
    assert sum(p.stat().st_size for p in files) < 2_000_000
    assert len({c["id"] for c in runner.CASES}) == len(runner.CASES)
    assert all((runner.FILES / c["file"]).exists() for c in runner.CASES)
    assert {c["expect"] for c in runner.CASES} == {"ok", "error"}


def test_corpus_is_deterministic(tmp_path):
    """make_corpus.py writes exactly the committed files, byte for byte."""
    import make_corpus

    make_corpus.main(tmp_path / "files")

    def digests(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digests(tmp_path / "files") == digests(runner.FILES)


@pytest.mark.parametrize("case", runner.CASES, ids=[c["id"] for c in runner.CASES])
def test_bad_input(case, tmp_path, toy_pipeline_cache):
    result = runner.run_case(case, tmp_path)
    assert result.handled, f"{case['id']}: {result.why} | {result.outcome}: {result.message}"
    assert not (tmp_path / runner.MARKER).exists()


def _gray(path: Path) -> np.ndarray:
    return np.asarray(_open_rgb(path).convert("L"), dtype=np.float64)


def test_graceful_conversions_keep_the_picture():
    """16-bit grey is scaled (PIL's convert would clip it to white), EXIF rotation is applied, CMYK/palette/animated
    images give the same picture, transparency becomes white."""
    ref = _gray(REFERENCE)
    for name in ("gray-16bit/scene.png", "exif-rotated/scene.jpg", "cmyk/scene.jpg", "animated-gif/scene.gif",
                 "animated-png/scene.png", "palette/scene.png"):
        assert np.abs(_gray(IMAGES / name) - ref).mean() < 3, name
    alpha = np.asarray(_open_rgb(IMAGES / "alpha/scene.png"))
    assert (alpha[:, :16] == 255).all()  # the transparent strip (black underneath) is composited over white
