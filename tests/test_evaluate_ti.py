"""The bundled concept sets and `evaluate ti`'s scoring (the benchmark itself is run from the CLI, not here)."""
import numpy as np
import pytest
from PIL import Image

from conceptkit.evaluate import ti
from conceptkit.learn.ti_config import TIConfig
from conceptkit.shapes.concepts import CONCEPTS, concept_folder
from conceptkit.shapes.render import render
from conceptkit.shapes.world import HELD_OUT_TRIPLES, UNNAMED_SHAPES, Obj, Scene


def test_concept_sets_are_shipped_as_rendered_and_meet_the_brief():
    assert len(CONCEPTS) >= 4
    assert sum(c.shape in UNNAMED_SHAPES for c in CONCEPTS) >= 2
    assert all((c.shape, c.color, c.pattern) in HELD_OUT_TRIPLES for c in CONCEPTS if c.named)
    for concept in CONCEPTS:
        files = sorted(concept_folder(concept).glob("*.png"))
        assert len(files) == 4
        for path, image in zip(files, concept.images()):
            assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image))


@pytest.mark.parametrize("template,requested", ti.COMPOSITIONAL)
def test_scoring_reads_fidelity_and_each_requested_attribute(template, requested):
    concept = CONCEPTS[0]
    right = Scene(requested["background"], (Obj(concept.shape, concept.color, concept.pattern, requested["position"],
                                                requested["size"]),))
    assert ti.score(render(right), concept, requested) == {"fidelity": True, "background": True, "position": True,
                                                           "size": True}
    wrong_bg = "teal" if requested["background"] != "teal" else "gray"
    wrong_pos = "center" if requested["position"] != "center" else "left"
    wrong = Scene(wrong_bg, (Obj("circle", concept.color, concept.pattern, wrong_pos, requested["size"]),))
    assert ti.score(render(wrong), concept, requested) == {"fidelity": False, "background": False, "position": False,
                                                           "size": True}


def test_summary_averages_images_and_requested_attributes():
    rows = [{"fidelity": True}, {"fidelity": False, "background": True, "position": False, "size": True}]
    s = ti.summarise(rows)
    assert s["fidelity"] == 0.5 and s["adherence"] == pytest.approx(2 / 3)
    assert (s["adherence_background"], s["adherence_position"], s["adherence_size"]) == (1.0, 0.0, 1.0)


def test_evaluate_ti_end_to_end_on_the_fixture(sd_tiny_dir, tmp_path):
    cfg = TIConfig(steps=2, batch=1, validation_prompts=())
    results = ti.evaluate_ti(str(sd_tiny_dir), cfg, concepts=CONCEPTS[:1], seeds=1, steps=2, out_dir=tmp_path,
                             progress=False)
    for key in ("ti.fidelity", "ti.adherence", "init_word.fidelity", "text.fidelity", "seconds_per_concept"):
        assert 0 <= results[key] <= 1 or key == "seconds_per_concept"
    assert set(results["concepts"]) == {CONCEPTS[0].name}
    assert Image.open(tmp_path / "grid.png").size == (64 * 7 * 2 + 8, 64 * 2)
    assert (tmp_path / CONCEPTS[0].name / "embedding" / "learned_embeds.safetensors").is_file()
    assert "| **all** |" in ti.table(results)
