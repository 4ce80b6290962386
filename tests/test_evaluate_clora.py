"""`evaluate clora`: the success rule, the prompt set and the training captions (the run itself is a benchmark)."""
from PIL import Image

from conceptkit.evaluate.clora import (EVAL_SEEDS, TRIGGERS, TUNING_SEEDS, captions, concepts_found, lora_files,
                                       pairs, success)
from conceptkit.models.loading import load_pipeline
from conceptkit.shapes.concepts import CONCEPTS, by_name
from conceptkit.shapes.render import render
from conceptkit.shapes.world import EVAL_SEED_BASE, Obj, Scene

STAR, CROSS = by_name("red-striped-star"), by_name("pink-checkered-cross")


def scene(left, right) -> Image.Image:
    objs = tuple(Obj(c.shape, color, c.pattern, pos, "medium") for (c, color), pos in
                 zip([left, right], ["left", "right"]))
    return Image.fromarray(render(Scene("gray", objs)))


def test_success_needs_both_concepts_each_with_its_own_attributes():
    both = scene((STAR, STAR.color), (CROSS, CROSS.color))
    assert success(both, STAR, CROSS) and success(both, CROSS, STAR)
    swapped = scene((STAR, CROSS.color), (CROSS, STAR.color))  # colours swapped between the objects
    assert not success(swapped, STAR, CROSS) and concepts_found(swapped, STAR, CROSS)[0] == 0
    one_right = scene((STAR, STAR.color), (CROSS, "blue"))
    assert not success(one_right, STAR, CROSS) and concepts_found(one_right, STAR, CROSS)[0] == 1
    twice = scene((STAR, STAR.color), (STAR, STAR.color))  # one concept copied onto both objects
    assert not success(twice, STAR, CROSS)
    single = Image.fromarray(render(Scene("gray", (Obj(STAR.shape, STAR.color, STAR.pattern, "left", "large"),))))
    assert not success(single, STAR, CROSS)


def test_prompt_set_and_seeds_are_held_out():
    assert len(pairs()) >= 6 and all(a != b for a, b, _ in pairs())
    assert len(EVAL_SEEDS) >= 8 and min(EVAL_SEEDS) >= EVAL_SEED_BASE
    assert not set(EVAL_SEEDS) & set(TUNING_SEEDS)


def test_triggers_are_single_tokens_and_every_caption_says_one():
    tok = load_pipeline("toy").tokenizer
    for concept in CONCEPTS:
        trigger = TRIGGERS[concept.name]
        assert len(tok(trigger, add_special_tokens=False).input_ids) == 1
        for text in captions(concept):
            assert text.split().count(trigger) == 1


def test_bundled_loras_exist_and_carry_their_trigger():
    from conceptkit.models.lora import read_lora_info

    for concept in CONCEPTS:
        info = read_lora_info(lora_files(None)[concept.name])
        assert info.trigger == TRIGGERS[concept.name] and info.class_word in ("object", concept.shape)
