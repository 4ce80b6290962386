"""Validation is part of a training run's time: it samples at the training resolution (not the model's native
size), and the run's first line says what it will cost and how to skip it (issue 21). On the tiny SD-1.x fixture,
whose native size is 64 px, trained at 32 px."""
import pytest
from PIL import Image

from conceptkit.cli import main

from test_textual_inversion import write_concept

SIZE = 128  # the fixture's native size is 64


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    return write_concept(tmp_path_factory.mktemp("concept") / "images", size=SIZE)


def validation_images(out, step):
    folder = out / "validation" / f"step-{step:06d}"
    return [p for p in sorted(folder.glob("*.png")) if p.name != "grid.png"]


@pytest.mark.parametrize("command", [
    ["learn", "ti", "--token", "<s1>", "--batch", "1"],
    ["learn", "lora", "--prompt", "a photo of zwx star", "--trigger", "zwx", "--batch", "1", "--rank", "2"],
])
def test_validation_images_have_the_training_resolution_and_the_first_line_says_how_to_skip(
        command, toy_model_env, concept, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(command + ["--images", str(concept), "--steps", "1", "--resolution", str(SIZE),
                           "--out", str(out)]) == 0
    err = capsys.readouterr().err
    first = err.lstrip().splitlines()[0]
    assert "--no-validation" in first and f"{SIZE}x{SIZE} px" in first, err[:400]
    assert "validation at step 1" in err  # its progress bar
    images = validation_images(out, 1)
    assert len(images) == 4
    for path in images:
        assert Image.open(path).size == (SIZE, SIZE)


@pytest.mark.parametrize("command", [
    ["learn", "ti", "--token", "<s1>", "--batch", "1"],
    ["learn", "lora", "--prompt", "a photo of zwx star", "--trigger", "zwx", "--batch", "1", "--rank", "2"],
])
def test_no_validation_writes_no_images_and_announces_none(command, toy_model_env, concept, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(command + ["--images", str(concept), "--steps", "1", "--no-validation", "--out", str(out)]) == 0
    assert "--no-validation" not in capsys.readouterr().err
    assert not (out / "validation").exists()


def test_pretrain_announces_validation_and_no_validation_skips_it(toy_model_env, tmp_path, capsys):
    concept = write_concept(tmp_path / "images")  # 64 px: the fixture's native size
    base = ["learn", "promptnet", "--pretrain", "--images", str(concept), "--steps", "1", "--batch", "2",
            "--validate-every", "0"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "--no-validation" in err.lstrip().splitlines()[0] and "validation at step 1" in err, err[:400]
    # PromptNet trains at the model's native size only (its context tokens are sized by it): so does validation
    assert Image.open(tmp_path / "a" / "validation" / "step-000001.png").size == (4 * 64, 2 * 64)  # 4 references, 1 prompt row
    assert main(base + ["--no-validation", "--out", str(tmp_path / "b")]) == 0
    assert not (tmp_path / "b" / "validation").exists()
