"""evaluate base's scoring: per-attribute reads and the per-size split of single.shape."""
from dataclasses import replace

from conceptkit.evaluate.base import SINGLE_KEYS, score_single, summarise
from conceptkit.shapes.render import render
from conceptkit.shapes.world import Obj, Scene


def scene(shape: str, size: str) -> Scene:
    return Scene("gray", (Obj(shape, "red", "plain", "center", size),), ((0, 0),))


def test_single_scores_split_shape_by_the_requested_size():
    small, large = scene("diamond", "small"), scene("square", "large")
    right_small = score_single(render(small), small)
    assert right_small["shape"] and right_small["shape_small"] and "shape_large" not in right_small
    # a circle drawn where a large square was asked: wrong shape, counted under large, colour still right
    asked = replace(large, objects=(replace(large.objects[0], shape="square"),))
    drawn = replace(large, objects=(replace(large.objects[0], shape="circle"),))
    wrong_large = score_single(render(drawn), asked)
    assert not wrong_large["shape"] and not wrong_large["shape_large"] and wrong_large["color"]
    summary = summarise([right_small, wrong_large, right_small], SINGLE_KEYS)
    assert (summary["shape"], summary["shape_large"], summary["shape_small"], summary["color"]) == (0.6667, 0.0, 1.0, 1.0)
