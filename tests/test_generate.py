"""`generate` (Python API and CLI), `info`, and the CLI's one-line errors, on the tiny SD-1.x fixture."""
import json

import numpy as np
import pytest
from PIL import Image

from conceptkit.cli import main
from conceptkit.errors import UserError
from conceptkit.generate.images import generate
from conceptkit.generate.prompts import read_prompt_file
from conceptkit.models.loading import load_pipeline


@pytest.fixture(scope="module")
def pipe(sd_tiny_dir):
    return load_pipeline(str(sd_tiny_dir))


def test_generate_writes_images_and_grid_and_is_seeded(pipe, tmp_path):
    out = generate(pipe, ["a red circle", "a blue square"], seed=3, num_images=2, steps=2, out_dir=tmp_path,
                   progress=False)
    assert out.seeds == [3, 4, 3, 4]
    assert len(out.paths) == 4 and all(p.is_file() for p in out.paths)
    grid = Image.open(out.grid_path)
    assert grid.size == (2 * 64, 2 * 64)
    again = generate(pipe, ["a red circle", "a blue square"], seed=3, num_images=2, steps=2, progress=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again.images, out.images))
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(out.images[1]))


def test_an_image_does_not_depend_on_batching(pipe):
    together = generate(pipe, ["a red circle", "a cat"], seed=0, steps=2, batch_size=2, progress=False)
    alone = generate(pipe, ["a cat"], seed=0, steps=2, batch_size=1, progress=False)
    a, b = np.asarray(together.images[1], np.int16), np.asarray(alone.images[0], np.int16)
    assert np.abs(a - b).max() <= 1  # batched matmuls may differ in the last bit


@pytest.mark.parametrize("scheduler", ["dpm++", "euler", "euler-a", "pndm"])
def test_every_scheduler_runs_and_changes_the_result(pipe, scheduler):
    before = type(pipe.scheduler)
    image = generate(pipe, "a dog", steps=3, scheduler=scheduler, progress=False).images[0]
    ddim = generate(pipe, "a dog", steps=3, scheduler="ddim", progress=False).images[0]
    assert image.size == (64, 64)
    assert np.abs(np.asarray(image, np.int16) - np.asarray(ddim, np.int16)).max() > 0
    assert type(pipe.scheduler) is before  # the loop builds its own scheduler; the pipeline's stays


def test_bad_requests_are_user_errors(pipe, tmp_path):
    with pytest.raises(UserError, match="unknown scheduler"):
        generate(pipe, "x", scheduler="nope", progress=False)
    with pytest.raises(UserError, match="multiple of 8"):
        generate(pipe, "x", height=60, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(UserError, match="no prompt"):
        read_prompt_file(empty)


def test_prompt_file_skips_comments_and_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n# note\n  a blue square  \n")
    assert read_prompt_file(f) == ["a red circle", "a blue square"]


def test_cli_generate_from_a_prompt_file(toy_model_env, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    code = main(["generate", "--prompt-file", str(prompts), "--steps", "2", "--num-images", "2",
                 "--scheduler", "euler", "--out", str(tmp_path / "out")])
    assert code == 0
    assert len(list((tmp_path / "out").glob("0*.png"))) == 4
    assert (tmp_path / "out" / "grid.png").is_file()
    assert "grid" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_info_prints_versions_as_json(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("conceptkit", "device", "bundled_model", "torch", "diffusers", "transformers", "peft"):
        assert info[key]
    assert info["torch"].startswith("2.13.0")


def test_shapes_cli_samples_and_reads_back(tmp_path, capsys):
    assert main(["shapes", "sample", "--n", "3", "--seed", "7", "--out", str(tmp_path / "ds")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert main(["shapes", "read", str(tmp_path / "ds" / rows[0]["file_name"])]) == 0
    reading = json.loads(capsys.readouterr().out)[0]
    assert reading["background"] == rows[0]["scene"]["background"]
    assert [o["shape"] for o in reading["objects"]] == [o["shape"] for o in rows[0]["scene"]["objects"]]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["shapes", "read", str(bad)]) == 2
    assert "bad.png" in capsys.readouterr().err
