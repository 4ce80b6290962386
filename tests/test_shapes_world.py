"""The shapes world: splits, renderer, captions, tokenizer and the oracle on clean renders."""
import itertools
import json
import random

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPTokenizer

from conceptkit.shapes import oracle
from conceptkit.shapes.captions import caption, vocabulary
from conceptkit.shapes.dataset import scenes, write_image_folder
from conceptkit.shapes.render import render
from conceptkit.shapes.tokenizer import CLIP_PATTERN, world_words, write_tokenizer
from conceptkit.shapes.world import (
    BACKGROUNDS, COLORS, EVAL_SEED_BASE, HELD_OUT_TRIPLES, NAMED_SHAPES, PATTERNS, UNNAMED_SHAPES, Obj, Scene,
    is_held_out, sample_scene,
)


def test_held_out_triples_are_fixed_and_every_pair_stays_in_training():
    assert len(HELD_OUT_TRIPLES) == 24
    assert all(s in NAMED_SHAPES for s, _, _ in HELD_OUT_TRIPLES)
    training = set(itertools.product(NAMED_SHAPES, COLORS, PATTERNS)) - set(HELD_OUT_TRIPLES)
    for t in HELD_OUT_TRIPLES:
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert any((u[i], u[j]) == (t[i], t[j]) for u in training), (t, i, j)


def test_training_scenes_never_use_held_out_triples_and_held_out_scenes_always_do():
    train = scenes(2000, seed=1)
    assert not any(is_held_out(o) for s in train for o in s.objects)
    held = scenes(200, seed=EVAL_SEED_BASE, held_out=True)
    assert all(is_held_out(o) for s in held for o in s.objects)
    with pytest.raises(ValueError):
        scenes(1, seed=EVAL_SEED_BASE)  # held-out seeds are not for training


def test_two_object_scenes_are_laid_out_left_and_right():
    pairs = [s for s in scenes(300, seed=2) if len(s.objects) == 2]
    assert len(pairs) > 60
    assert all([o.position for o in s.objects] == ["left", "right"] for s in pairs)


def test_render_is_deterministic_and_paints_the_background():
    scene = Scene("navy", (Obj("circle", "red", "striped", "center", "small"),))
    a, b = render(scene), render(scene)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert tuple(a[0, 0]) == BACKGROUNDS["navy"]
    assert tuple(a[32, 32]) != BACKGROUNDS["navy"]


def test_unnamed_shapes_are_never_named_in_captions():
    rng = random.Random(0)
    for s in scenes(1500, seed=3):
        text = caption(s, rng)
        for shape in UNNAMED_SHAPES:
            assert shape not in text
        if any(o.shape in UNNAMED_SHAPES for o in s.objects):
            assert "object" in text


def test_canonical_caption_names_every_attribute():
    scene = Scene("teal", (Obj("triangle", "orange", "dotted", "left", "large"),))
    assert caption(scene) == "a large orange dotted triangle on the left, on a teal background"


def test_captions_use_only_the_grammar_vocabulary():
    words = set(world_words())
    rng = random.Random(1)
    for s in scenes(500, seed=4):
        for token in CLIP_PATTERN.findall(caption(s, rng)):
            assert token in words or token == ",", token


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path_factory.mktemp("tok")))


def test_every_world_word_is_one_token(tokenizer):
    for word in vocabulary():
        ids = tokenizer(word).input_ids
        expected = len(CLIP_PATTERN.findall(word))  # "close-up" is three CLIP words
        assert len(ids) == 2 + expected, (word, ids)
    assert tokenizer.unk_token_id not in tokenizer("a red circle").input_ids[1:-1]


def test_unknown_words_still_tokenize_by_bytes(tokenizer):
    ids = tokenizer("a quokka").input_ids
    assert len(ids) > 4 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a quokka"


def test_oracle_reads_clean_renders():
    rng = random.Random(EVAL_SEED_BASE + 99)
    n, hits = 0, {"shape": 0, "color": 0, "pattern": 0, "position": 0, "background": 0}
    for _ in range(300):
        s = sample_scene(rng)
        r = oracle.read(render(s))
        hits["background"] += r.background == s.background
        assert r.count == len(s.objects)
        for want, got in zip(s.objects, r.objects):  # both are ordered left to right
            n += 1
            for k in ("shape", "color", "pattern", "position"):
                hits[k] += getattr(want, k) == getattr(got, k)
    assert hits["background"] / 300 >= 0.98
    for k in ("shape", "color", "pattern", "position"):
        assert hits[k] / n >= 0.98, (k, hits[k] / n)


def test_oracle_sees_an_empty_scene_as_empty():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:] = BACKGROUNDS["white"]
    r = oracle.read(img)
    assert r.background == "white" and r.count == 0


def test_image_folder_has_metadata_for_every_image(tmp_path):
    out = write_image_folder(tmp_path / "ds", scenes(5, seed=5))
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        stored = np.asarray(Image.open(out / row["file_name"]))
        assert np.array_equal(stored, render(Scene.from_dict(row["scene"])))
        assert row["text"]


def test_atomic_write_replaces_whole_files_and_cleans_up_on_failure(tmp_path):
    from conceptkit.files import atomic_write, atomic_write_text

    target = tmp_path / "out.txt"
    atomic_write_text(target, "first")
    assert target.read_text() == "first" and target.stat().st_mode & 0o644 == 0o644

    def broken(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "first"  # the earlier version survives
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind
