"""`evaluate clora`: the concepts, cases and seeds, the success rule, the LoRA recipe's captions (the run itself is a
benchmark)."""
import itertools

import pytest
from PIL import Image

from conceptkit.evaluate.clora import (EVAL_SEEDS, SPLIT_BACKGROUNDS, SPLITS, TRIGGERS, TUNING_SEEDS, Recipe, cases,
                                       lora_files, on_side, read_pair, slot, training_scenes, trigger)
from conceptkit.models.loading import load_pipeline
from conceptkit.shapes.captions import shape_word
from conceptkit.shapes.concepts import COMPOSE_TEST, COMPOSE_TUNE
from conceptkit.shapes.render import render
from conceptkit.shapes.world import EVAL_SEED_BASE, NAMED_SHAPES, Obj, Scene, is_held_out

CIRCLE, SQUARE = COMPOSE_TEST[0], COMPOSE_TEST[1]  # yellow checkered circle, blue plain square


def pair(left, right, bg="gray") -> Image.Image:
    """left/right: (shape, colour, pattern)."""
    objs = (Obj(*left, position="left", size="medium"), Obj(*right, position="right", size="medium"))
    return Image.fromarray(render(Scene(bg, objs)))


def t(c):
    return (c.shape, c.color, c.pattern)


def test_success_needs_each_concept_with_its_own_attributes_on_its_own_side():
    right = read_pair(pair(t(CIRCLE), t(SQUARE)), CIRCLE, SQUARE)
    assert right.success and right.success_any_side and right.found == 2 and not right.mixed
    sides = read_pair(pair(t(SQUARE), t(CIRCLE)), CIRCLE, SQUARE)  # both there, on the wrong sides
    assert not sides.success and sides.success_any_side and sides.found == 2
    swapped = read_pair(pair(("circle", "blue", "checkered"), ("square", "yellow", "plain")), CIRCLE, SQUARE)
    assert not swapped.success_any_side and swapped.found == 0 and swapped.mixed  # colours swapped: mixing
    patterned = read_pair(pair(t(CIRCLE), ("square", "blue", "checkered")), CIRCLE, SQUARE)
    assert not patterned.success and patterned.found == 1 and patterned.mixed  # the circle's pattern on the square
    other = read_pair(pair(t(CIRCLE), ("square", "green", "striped")), CIRCLE, SQUARE)
    assert not other.success and other.found == 1 and not other.mixed  # wrong, but not the other concept's
    twice = read_pair(pair(t(CIRCLE), t(CIRCLE)), CIRCLE, SQUARE)
    assert not twice.success and not twice.success_any_side
    single = Image.fromarray(render(Scene("gray", (Obj(*t(CIRCLE), position="left", size="large"),))))
    assert not read_pair(single, CIRCLE, SQUARE).success_any_side
    assert on_side(single, CIRCLE, "left") and not on_side(single, CIRCLE, "right")
    assert not on_side(single, SQUARE, "left")


def test_concepts_have_own_class_words_differ_pairwise_and_are_held_out():
    assert not set(COMPOSE_TUNE) & set(COMPOSE_TEST)
    for concepts in SPLITS.values():
        assert len(concepts) == 4
        for a, b in itertools.combinations(concepts, 2):
            assert a.shape != b.shape and a.color != b.color and a.pattern != b.pattern
        for c in concepts:
            assert c.shape in NAMED_SHAPES and shape_word(c.shape) == c.shape == slot(c)
            assert is_held_out(Obj(*t(c), position="left"))


def test_cases_cover_every_pair_both_sides_two_backgrounds_and_held_out_seeds():
    for split, concepts in SPLITS.items():
        got = cases(split)
        assert len(got) == 6 * 2 * 2
        assert {frozenset((c.first.name, c.second.name)) for c in got} == \
            {frozenset((a.name, b.name)) for a, b in itertools.combinations(concepts, 2)}
        for c in got:
            assert {c.left, c.right} == {c.first, c.second} and c.left != c.right
            phrase = c.prompt("FIRST", "SECOND")
            assert f"FIRST on the {c.first_side}" in phrase and f"SECOND on the {c.second_side}" in phrase
            assert c.template.index(slot(c.first)) < c.template.index(slot(c.second))
            assert c.regions == [c.first_side, c.second_side]
        # each concept is asked for on the left and on the right, named first and second
        for concept in concepts:
            assert {c.first_side if c.first == concept else c.second_side for c in got if concept in (c.first, c.second)} \
                == {"left", "right"}
        assert {c.background for c in got} == set(SPLIT_BACKGROUNDS[split]) and len(SPLIT_BACKGROUNDS[split]) == 2
    assert len(EVAL_SEEDS) >= 8 and min(EVAL_SEEDS) >= EVAL_SEED_BASE and len(TUNING_SEEDS) >= 8
    assert not set(EVAL_SEEDS) & set(TUNING_SEEDS)


def test_triggers_are_distinct_single_unused_tokens():
    tok = load_pipeline("toy").tokenizer
    from conceptkit.shapes.captions import vocabulary

    names = [c.name for c in COMPOSE_TUNE + COMPOSE_TEST]
    assert len({TRIGGERS[n] for n in names}) == len(names)
    for n in names:
        assert len(tok(TRIGGERS[n], add_special_tokens=False).input_ids) == 1
        assert TRIGGERS[n] not in vocabulary()  # a word the base model was never trained on
    # pivotal tuning (the recipe): a new word per concept, not a token of the tokenizer yet
    concepts = COMPOSE_TUNE + COMPOSE_TEST
    assert [trigger(c) for c in concepts] == [f"<{TRIGGERS[c.name]}>" for c in concepts]
    assert not {trigger(c) for c in concepts} & set(tok.get_vocab())
    assert [trigger(c, Recipe(trigger_ti_steps=0)) for c in concepts] == [TRIGGERS[c.name] for c in concepts]


def test_training_captions_name_the_concept_where_it_is_and_the_other_object_by_its_class_word():
    recipe = Recipe(pair_views=16, single_views=4)  # fewer than the recipe: quick
    for concept in COMPOSE_TUNE + COMPOSE_TEST:
        word = trigger(concept, recipe)
        scenes = training_scenes(concept, recipe)
        assert len(scenes) == 20
        orders = set()
        for scene, text in scenes:
            words = text.replace(",", "").split()
            assert words.count(word) == 1 and words[words.index(word) + 1] == concept.shape
            mine = [o for o in scene.objects if o.triple == t(concept)]
            assert len(mine) == 1
            assert text.split(f"{word} {concept.shape}")[1].split(",")[0].split(" and ")[0].strip() in (
                f"on the {mine[0].position}", "in the center", "at the top", "at the bottom", "")
            for other in scene.objects:
                if other is mine[0]:
                    continue
                assert other.shape != concept.shape and other.color != concept.color
                assert other.pattern != concept.pattern and not is_held_out(other)  # no benchmark concept
                assert f"a {other.shape} on the {other.position}" in text  # a plain class word, its side
                orders.add((mine[0].position, text.startswith(f"a {word}")))
        assert orders == {("left", True), ("left", False), ("right", True), ("right", False)}


def test_the_recipes_backgrounds_are_the_pair_views_backgrounds_in_turn_each_on_both_sides():
    concept = COMPOSE_TUNE[0]
    weighted = ("gray", "white", "navy", "white", "brown", "white", "teal")
    scenes = training_scenes(concept, Recipe(pair_views=28, single_views=0, backgrounds=weighted))
    assert [s.background for s, _ in scenes] == list(weighted) * 4
    mine = {(s.background, next(o.position for o in s.objects if o.triple == t(concept))) for s, _ in scenes}
    assert mine == {(bg, side) for bg in weighted for side in ("left", "right")}
    default = training_scenes(concept, Recipe(pair_views=10, single_views=0))
    assert sorted(s.background for s, _ in default) == sorted(["gray", "navy", "brown", "teal", "white"] * 2)


def test_bundled_loras_exist_and_carry_trigger_class_word_and_description():
    from conceptkit.models.lora import read_lora_info

    files = lora_files(None)
    for concept in COMPOSE_TUNE + COMPOSE_TEST:
        info = read_lora_info(files[concept.name])
        assert info.trigger == trigger(concept) and info.class_word == concept.shape
        assert info.embeddings == (trigger(concept),)  # the word, bundled
        assert info.metadata.get("description") == concept.description and info.rank == Recipe().rank
        assert files[concept.name].stat().st_size < 600_000


def test_cli_refuses_bad_combinations(capsys):
    from conceptkit.cli import main

    assert main(["evaluate", "clora", "--train-only"]) != 0
    assert "--train-only needs --train-loras" in capsys.readouterr().err
    assert main(["evaluate", "clora", "--methods", "clora,blend"]) != 0
    assert "unknown method 'blend'" in capsys.readouterr().err


@pytest.mark.parametrize("split", ["tune", "test"])
def test_descriptions_are_the_base_models_words(split):
    from conceptkit.shapes.captions import vocabulary

    for c in SPLITS[split]:
        assert all(w in vocabulary() for w in c.description.split())


def test_concept_loras_learn_their_word_first_and_bundle_it(tmp_path):
    """train_concept_loras with pivotal tuning (a tiny recipe): the word <z> is learned, bundled and named in the
    file; the pipeline's vocabulary is as before; with trigger_ti_steps=0 the trigger is the plain letter."""
    from conceptkit.evaluate.clora import train_concept_loras
    from conceptkit.models.lora import read_lora_info

    pipe = load_pipeline("toy")
    size = len(pipe.tokenizer)
    concept = COMPOSE_TEST[0]
    tiny = dict(pair_views=2, single_views=1, steps=2, batch=1, trigger_ti_views=2)
    files = train_concept_loras(pipe, tmp_path / "pivotal", [concept], recipe=Recipe(trigger_ti_steps=2, **tiny),
                                progress=False)
    info = read_lora_info(files[concept.name])
    assert info.trigger == trigger(concept) and info.embeddings == (trigger(concept),)
    assert (tmp_path / "pivotal" / "trigger-words" / concept.name / "learned_embeds.safetensors").is_file()
    assert len(pipe.tokenizer) == size
    plain = train_concept_loras(pipe, tmp_path / "plain", [concept], recipe=Recipe(trigger_ti_steps=0, **tiny),
                                progress=False)
    info = read_lora_info(plain[concept.name])
    assert info.trigger == TRIGGERS[concept.name] and info.embeddings == ()


def test_a_lora_end_is_chosen_by_its_score_ties_to_the_longer_end():
    from conceptkit.evaluate.clora import choose_end

    assert choose_end({1.0: 0.5, 0.67: 0.9, 0.5: 0.9}) == 0.67
    assert choose_end({1.0: 0.8, 0.67: 0.8, 0.5: 0.8}) == 1.0
    assert choose_end({1.0: 0.0, 0.5: 0.1}) == 0.5


def test_calibration_samples_the_loras_own_training_captions_at_training_seeds_and_keeps_the_best_end(monkeypatch):
    import re
    from types import SimpleNamespace

    from conceptkit.evaluate import clora

    seen = []

    def fake_compose(pipe, template, specs, *, methods, seeds, cfg):
        # draws the concept where the caption puts it only when the LoRA stops at half the steps; else a pink one
        (spec,) = specs
        seen.append((template, spec.end, tuple(seeds)))
        side = re.search(r"\{x\} on the (left|right)", template).group(1)
        color = CIRCLE.color if spec.end == 0.5 else "pink"
        image = Image.fromarray(render(Scene("gray", (Obj(CIRCLE.shape, color, CIRCLE.pattern, side, "medium"),))))
        return SimpleNamespace(images={"merge": [image] * len(seeds)})

    monkeypatch.setattr(clora, "compose", fake_compose)
    monkeypatch.setattr(clora, "unload_concepts", lambda pipe: None)
    files = clora.lora_files(None, SPLITS["test"])
    got = clora.calibrate_ends(None, None, [CIRCLE], files, views=3)
    assert got == {CIRCLE.name: {"end": 0.5, "scores": {1.0: 0.0, 0.67: 0.0, 0.5: 1.0}}}
    captions = [c for _, c in training_scenes(CIRCLE)[:3]]
    word = f"{trigger(CIRCLE)} {shape_word(CIRCLE.shape)}"
    assert [s[0] for s in seen] == [c.replace(word, "{x}") for c in captions] * 3
    assert all(max(seeds) < EVAL_SEED_BASE for *_, seeds in seen)  # training-range seeds, never the benchmark's
    assert [s[1] for s in seen] == [1.0] * 3 + [0.67] * 3 + [0.5] * 3


def test_the_bundled_ends_cover_every_benchmark_lora_and_follow_their_scores():
    import json

    from conceptkit.evaluate import clora

    data = json.loads((clora.bundled_loras_path() / clora.BUNDLED_ENDS).read_text())
    assert set(data["ends"]) == {c.name for c in COMPOSE_TUNE + COMPOSE_TEST}
    for name, c in data["ends"].items():
        scores = {float(end): share for end, share in c["scores"].items()}
        assert set(scores) == set(clora.END_CANDIDATES) and c["end"] == clora.choose_end(scores), name
    assert clora.bundled_ends()["yellow-checkered-circle"] == data["ends"]["yellow-checkered-circle"]["end"]
