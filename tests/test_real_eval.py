"""Real-concept evaluation: CLIP-I, CLIP-T and DINO against known answers, `evaluate images` and `evaluate
dreambench` (CLI and Python), and the A1111 `parameters` chunk every written image carries."""
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from conceptkit.cli import main
from conceptkit.errors import UserError
from conceptkit.evaluate.dreambench import evaluate_dreambench, read_dreambench
from conceptkit.evaluate.images import evaluate_images
from conceptkit.evaluate.similarity import (ClipScorer, DinoScorer, mean_se, pairwise_similarity, score,
                                            text_similarity)
from conceptkit.generate.images import generate
from conceptkit.generate.infotext import Settings, infotext, parse_infotext, read_parameters, save_png
from conceptkit.models.fixtures import build_tiny_clip, build_tiny_dinov2
from conceptkit.models.loading import load_pipeline
from conceptkit.shapes.concepts import by_name, concept_folder

RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    return build_tiny_dinov2(tmp_path_factory.mktemp("dino") / "dino")


def solid(color, size=(48, 40)) -> Image.Image:
    return Image.new("RGB", size, color)


def folder_of(path: Path, images: list[Image.Image]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(path / f"{i}.png")
    return path


class ColourEncoder:
    """A fake encoder with chosen embeddings: a red image is e0, blue e1, anything else e2; a text naming 'red' is
    e0 (times 3: the length must not matter), 'blue' e1, else e3."""

    name = "colour"

    def images(self, images):
        rows = []
        for image in images:
            r, g, b = image.convert("RGB").getpixel((0, 0))
            rows.append(0 if r > 150 and b < 100 else 1 if b > 150 and r < 100 else 2)
        return torch.eye(4)[rows]

    def texts(self, texts):
        return torch.stack([3 * torch.eye(4)[0 if "red" in t else 1 if "blue" in t else 3] for t in texts])


# --- the definitions, on vectors and images whose answer is known -------------------------------------------------

def test_pairwise_similarity_is_the_mean_over_all_pairs_of_normalised_cosines():
    e = torch.eye(3)
    assert pairwise_similarity(e[:1] * 5, e[:1]).item() == pytest.approx(1.0)  # itself (scale does not matter)
    assert pairwise_similarity(e[:1], e[1:2] * 2).item() == pytest.approx(0.0)  # orthogonal
    # one generated image against references e0 and e1: (1 + 0) / 2
    assert pairwise_similarity(e[:1], e[:2]).tolist() == pytest.approx([0.5])
    # against a reference at 60 degrees and one opposite: (0.5 - 1) / 2
    refs = torch.tensor([[0.5, math.sqrt(3) / 2, 0.0], [-2.0, 0.0, 0.0]])
    assert pairwise_similarity(e[:1], refs).tolist() == pytest.approx([-0.25])
    assert text_similarity(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[2.0, 2.0], [0.0, 1.0]])).tolist() \
        == pytest.approx([1.0, 0.0])


def test_mean_and_standard_error():
    assert mean_se([1.0, 0.0, None]) == {"mean": 0.5, "se": pytest.approx(0.5), "n": 2}
    assert mean_se([0.3]) == {"mean": 0.3, "se": None, "n": 1}
    assert mean_se([None]) == {"mean": None, "se": None, "n": 0}


def test_chosen_embeddings_give_the_known_scores(tmp_path):
    generated = folder_of(tmp_path / "gen", [solid(RED), solid(BLUE), solid(GREEN)])
    reference = folder_of(tmp_path / "ref", [solid(RED), solid(BLUE)])
    fake = ColourEncoder()
    result = evaluate_images(generated, reference, prompt="a red thing", clip=fake, dino=fake, progress=False)
    rows = {r["file"]: r for r in result["images"]}
    # red vs {red, blue}: (1 + 0) / 2; green is orthogonal to both: 0
    assert [rows[f]["clip_i"] for f in ("0.png", "1.png", "2.png")] == pytest.approx([0.5, 0.5, 0.0])
    assert [rows[f]["dino"] for f in ("0.png", "1.png", "2.png")] == pytest.approx([0.5, 0.5, 0.0])
    # "a red thing" is e0: the red image 1, the blue and green ones 0
    assert [rows[f]["clip_t"] for f in ("0.png", "1.png", "2.png")] == pytest.approx([1.0, 0.0, 0.0])
    assert result["means"]["clip_i"]["mean"] == pytest.approx(1 / 3)
    assert result["means"]["clip_i"]["se"] == pytest.approx(math.sqrt(1 / 12 / 3))  # sample std of (.5,.5,0)
    assert result["means"]["clip_t"]["mean"] == pytest.approx(1 / 3)


def test_an_image_against_itself_scores_one_with_real_models(tmp_path, clip_dir, dino_dir):
    image = by_name("red-striped-star").images()[0]
    generated = folder_of(tmp_path / "gen", [image])
    clip, dino = ClipScorer(clip_dir), DinoScorer(dino_dir)
    result = evaluate_images(generated, generated, clip=clip, dino=dino, progress=False)
    row = result["images"][0]
    assert row["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert row["dino"] == pytest.approx(1.0, abs=1e-5)
    assert row["clip_t"] is None and result["means"]["clip_t"]["mean"] is None  # no prompt known: null
    # a different image scores below 1 with both models
    other = folder_of(tmp_path / "other", [by_name("pink-checkered-cross").images()[1]])
    apart = evaluate_images(generated, other, clip=clip, dino=dino, progress=False)["images"][0]
    assert apart["clip_i"] < 0.9999 and apart["dino"] < 0.9999


def test_real_models_embeddings_are_what_the_docstring_says(clip_dir, dino_dir):
    """CLIP-I uses get_image_features, CLIP-T get_text_features, DINO the last layer's CLS token; all normalised."""
    images = [by_name("red-striped-star").images()[0], solid(BLUE, (70, 50))]
    clip, dino = ClipScorer(clip_dir), DinoScorer(dino_dir)
    pixels = clip.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = clip.model.get_image_features(pixel_values=pixels)
        expected = getattr(out, "pooler_output", out)
        tokens = clip.tokenizer(["a photo of a dog"], return_tensors="pt")
        text = clip.model.get_text_features(**tokens)
        text = getattr(text, "pooler_output", text)
        cls = dino.model(pixel_values=dino.processor(images=images, return_tensors="pt")["pixel_values"]
                         ).last_hidden_state[:, 0]
    assert torch.allclose(clip.images(images), torch.nn.functional.normalize(expected, dim=-1), atol=1e-6)
    assert torch.allclose(clip.texts(["a photo of a dog"]), torch.nn.functional.normalize(text, dim=-1), atol=1e-6)
    assert torch.allclose(dino.images(images), torch.nn.functional.normalize(cls, dim=-1), atol=1e-6)
    assert clip.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]  # real CLIP BPE
    # batching does not change an embedding
    rows = score(images, ["a dog", None], images[:1], clip=clip, dino=dino, batch_size=1, progress=False)
    together = score(images, ["a dog", None], images[:1], clip=clip, dino=dino, batch_size=8, progress=False)
    assert [r["clip_i"] for r in rows] == pytest.approx([r["clip_i"] for r in together], abs=1e-5)
    assert rows[0]["clip_t"] is not None and rows[1]["clip_t"] is None


# --- the PNG settings ---------------------------------------------------------------------------------------------

def test_infotext_is_a1111s_format_and_round_trips(tmp_path):
    s = Settings(prompt="a photo of <star>, on a navy background", negative_prompt="blurry, dark", steps=30,
                 sampler="euler-a", cfg_scale=7.5, seed=1000000, width=64, height=48, model="shapes-base",
                 extra={"TI": "<star>", "Lora": "cat: 0.7, dog: 1"})
    text = infotext(s)
    lines = text.split("\n")
    assert lines[0] == "a photo of <star>, on a navy background"
    assert lines[1] == "Negative prompt: blurry, dark"
    assert lines[2].startswith('Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 1000000, Size: 64x48, '
                               'Model: shapes-base, TI: <star>, Lora: "cat: 0.7, dog: 1", Version: ')
    path = save_png(Image.new("RGB", (64, 48)), tmp_path / "x.png", s)
    with Image.open(path) as im:
        assert im.text["parameters"] == text  # read back with PIL
    parsed = parse_infotext(read_parameters(path))
    assert parsed["prompt"] == s.prompt and parsed["negative_prompt"] == "blurry, dark"
    assert (parsed["Steps"], parsed["Sampler"], parsed["CFG scale"], parsed["Seed"], parsed["Size"],
            parsed["Model"]) == ("30", "Euler a", "7.5", "1000000", "64x48", "shapes-base")
    assert parsed["Lora"] == "cat: 0.7, dog: 1" and parsed["TI"] == "<star>"
    # no negative prompt, and a prompt without settings line (A1111: then it is all prompt)
    assert parse_infotext(infotext(Settings(prompt="a cat", steps=1, seed=2)))["negative_prompt"] == ""
    assert parse_infotext("just a prompt\nsecond line")["prompt"] == "just a prompt\nsecond line"


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy")


def test_generated_pngs_record_their_settings_and_evaluate_images_reads_the_prompt(toy, tmp_path, clip_dir):
    from conceptkit.generate.loading import load_loras

    prompt = "a small red striped object at the bottom, on a navy background"
    out = generate(toy, [prompt], negative_prompt="blurry", seed=5, num_images=2, steps=2, scheduler="dpm++",
                   guidance_scale=6.0, out_dir=tmp_path / "gen", progress=False)
    p = parse_infotext(read_parameters(out.paths[1]))
    assert p["prompt"] == prompt and p["negative_prompt"] == "blurry"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"], p["Size"], p["Model"]) == (
        "2", "DPM++ 2M", "6", "6", "64x64", "shapes-base")
    assert "Lora" not in p and "TI" not in p
    assert parse_infotext(read_parameters(out.grid_path))["Seed"] == "5"  # the grid: its first image's
    # a LoRA in use is recorded with its weight
    lora = Path(__file__).parents[1] / "src/conceptkit/bundled/loras/red-striped-star.safetensors"
    load_loras(toy, [f"{lora}:0.6"])
    try:
        with_lora = generate(toy, ["a z object"], steps=1, out_dir=tmp_path / "lora", progress=False)
    finally:
        toy.delete_adapters(list(toy.conceptkit_loras))
        toy.conceptkit_loras = {}
    assert parse_infotext(read_parameters(with_lora.paths[0]))["Lora"] == "red-striped-star: 0.6"
    # evaluate images reads the prompt back; an image without one gets CLIP-T null
    Image.new("RGB", (64, 64), RED).save(tmp_path / "gen" / "plain.png")
    result = evaluate_images(tmp_path / "gen", concept_folder(by_name("red-striped-star")), clip=str(clip_dir),
                             progress=False)
    rows = {r["file"]: r for r in result["images"]}
    assert "grid.png" not in rows
    assert rows[out.paths[0].name]["prompt"] == prompt and rows[out.paths[0].name]["prompt_from"] == "recorded"
    assert rows[out.paths[0].name]["clip_t"] is not None
    assert rows["plain.png"]["clip_t"] is None and rows["plain.png"]["prompt_from"] is None
    assert result["means"]["clip_t"]["n"] == 2 and result["means"]["clip_i"]["n"] == 3
    assert result["means"]["dino"]["mean"] is None


def test_ti_words_are_recorded(toy, tmp_path):
    from conceptkit.models.embeddings import Embedding, add_embedding

    add_embedding(toy, Embedding("<thing>", torch.zeros(1, toy.text_encoder.config.hidden_size), "diffusers"))
    out = generate(toy, ["a photo of <thing>"], steps=1, out_dir=tmp_path, progress=False)
    assert parse_infotext(read_parameters(out.paths[0]))["TI"] == "<thing>"


# --- the CLI ------------------------------------------------------------------------------------------------------

def test_evaluate_images_cli_writes_json_and_prints_the_table(tmp_path, clip_dir, dino_dir, capsys):
    star = by_name("red-striped-star").images()
    generated = folder_of(tmp_path / "gen", star[:2])
    reference = folder_of(tmp_path / "ref", star)
    assert main(["evaluate", "images", "--images", str(generated), "--reference", str(reference), "--prompt",
                 "a red star", "--clip", str(clip_dir), "--dino", str(dino_dir), "--batch", "3",
                 "--json", str(tmp_path / "out.json")]) == 0
    printed = capsys.readouterr().out
    assert "| images | references | CLIP-I | CLIP-T | DINO |" in printed
    result = json.loads((tmp_path / "out.json").read_text())
    assert [r["file"] for r in result["images"]] == ["0.png", "1.png"]
    assert all(r["prompt"] == "a red star" and r["prompt_from"] == "--prompt" for r in result["images"])
    m = result["means"]
    assert m["clip_i"]["n"] == 2 and m["dino"]["n"] == 2 and m["clip_t"]["n"] == 2
    # each generated image is one of the four references: its own pair gives 1, so the mean is above 1/4
    assert all(r["clip_i"] > 0.25 and r["dino"] > 0.25 for r in result["images"])
    assert f"{m['clip_i']['mean']:.3f}" in printed and result["settings"]["references"] == 4


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "wrong-kind", "not-cached", "no-model"])
def test_bad_input_is_one_line(case, tmp_path, clip_dir, dino_dir, capsys):
    good = folder_of(tmp_path / "good", [solid(RED)])
    images, clip, dino = str(good), str(clip_dir), None
    expected = {"missing": "does not exist", "empty": "holds no images", "corrupt": "cannot read bad.png",
                "wrong-kind": "a 'dinov2' model, not CLIP", "not-cached": "not in the local Hugging Face cache",
                "no-model": "no scoring model"}[case]
    if case == "missing":
        images = str(tmp_path / "nowhere")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        images = str(tmp_path / "empty")
    elif case == "corrupt":
        (good / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "wrong-kind":
        clip = str(dino_dir)
    elif case == "not-cached":
        clip = "someone/clip-not-here"
    elif case == "no-model":
        clip = None
    argv = ["evaluate", "images", "--images", images, "--reference", str(good)]
    argv += ["--clip", clip] if clip else []
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    with pytest.raises(UserError):
        evaluate_images(images, good, clip=clip, dino=dino, progress=False)


# --- DreamBench ---------------------------------------------------------------------------------------------------

PROMPTS_AND_CLASSES = """Classes
subject_name,class
star_toy,object
cross_toy,cross

Prompts
Object Prompts
prompt_list = [
'a {0} {1} on a navy background'.format(unique_token, class_token),
'a small {0} {1} at the top, on a white background'.format(unique_token, class_token),
'a {0} {1} on the left'.format(unique_token, class_token),
]

Live Subject Prompts
prompt_list = [
'a {0} {1} on a teal background'.format(unique_token, class_token),
]
"""


@pytest.fixture
def fake_dreambench(tmp_path) -> Path:
    """DreamBench's layout (dataset/<subject>/*.jpg + prompts_and_classes.txt), two shapes-world subjects."""
    root = tmp_path / "dreambench" / "dataset"
    for subject, concept in (("star_toy", "red-striped-star"), ("cross_toy", "pink-checkered-cross")):
        folder = root / subject
        folder.mkdir(parents=True)
        for i, image in enumerate(by_name(concept).images()[:3]):
            image.save(folder / f"{i:02d}.jpg", quality=95)
    (root / "prompts_and_classes.txt").write_text(PROMPTS_AND_CLASSES)
    return tmp_path / "dreambench"


def test_read_dreambench_layout(fake_dreambench):
    bench = read_dreambench(fake_dreambench)
    assert [(s.name, s.cls, s.live) for s in bench.subjects] == [("cross_toy", "cross", False),
                                                                 ("star_toy", "object", False)]
    assert bench.object_prompts[0] == "a {0} {1} on a navy background" and len(bench.object_prompts) == 3
    assert bench.live_prompts == ["a {0} {1} on a teal background"]


def test_evaluate_dreambench_cli_ti(fake_dreambench, tmp_path, clip_dir, dino_dir, capsys):
    out = tmp_path / "run"
    assert main(["evaluate", "dreambench", "--data", str(fake_dreambench), "--method", "ti", "--clip",
                 str(clip_dir), "--dino", str(dino_dir), "--prompts", "2", "--images-per-prompt", "2",
                 "--train-steps", "2", "--steps", "2", "--out", str(out), "--json", str(tmp_path / "db.json")]) == 0
    printed = capsys.readouterr().out
    assert "| method | DINO | CLIP-I | CLIP-T | images |" in printed and "| cross_toy |" in printed
    result = json.loads((tmp_path / "db.json").read_text())
    assert len(result["images"]) == 2 * 2 * 2  # subjects x prompts x seeds
    assert result["means"]["clip_i"]["n"] == 8 and result["means"]["clip_t"]["n"] == 8
    assert result["means"]["dino"]["se"] is not None
    assert set(result["subjects"]) == {"cross_toy", "star_toy"}
    assert result["real_images"]["dino"]["n"] == 2 and result["real_images"]["dino"]["mean"] < 0.9999
    first = result["images"][0]
    assert first["prompt"] == "a <cross_toy> cross on a navy background"
    assert first["scored_prompt"] == "a cross on a navy background"  # CLIP-T without the learned word
    recorded = parse_infotext(read_parameters(out / first["file"]))
    assert recorded["prompt"] == first["prompt"] and recorded["TI"] == "<cross_toy>" and recorded["Steps"] == "2"
    assert (out / "cross_toy" / "ti" / "learned_embeds.safetensors").is_file()
    assert json.loads((out / "dreambench.json").read_text())["means"] == result["means"]


def test_evaluate_dreambench_python_lora(fake_dreambench, tmp_path):
    pipe = load_pipeline("toy")
    fake = ColourEncoder()
    result = evaluate_dreambench(pipe, fake_dreambench / "dataset", method="lora", clip=fake, dino=fake,
                                 subjects=["star_toy"], prompts=1, images_per_prompt=1, train_steps=1, steps=1,
                                 out_dir=tmp_path / "run", progress=False)
    assert [r["prompt"] for r in result["images"]] == ["a sks object on a navy background"]
    recorded = parse_infotext(read_parameters(tmp_path / "run" / result["images"][0]["file"]))
    assert recorded["Lora"] == "dreambench: 1"
    assert not pipe.get_list_adapters() or not any(pipe.get_list_adapters().values())  # unloaded afterwards
    # the fake encoder puts every real photo at e2 (not red, not blue): they are identical to each other
    assert result["real_images"]["clip_i"]["mean"] == pytest.approx(1.0)


def test_dreambench_bad_layout_is_one_line(tmp_path, capsys, clip_dir):
    (tmp_path / "db").mkdir()
    assert main(["evaluate", "dreambench", "--data", str(tmp_path / "db"), "--clip", str(clip_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no prompts_and_classes.txt" in err and "\n" not in err


def test_report_renders_the_scores(tmp_path, capsys):
    fake = ColourEncoder()
    generated = folder_of(tmp_path / "gen", [solid(RED), solid(GREEN)])
    result = evaluate_images(generated, folder_of(tmp_path / "ref", [solid(RED), solid(BLUE)]), prompt="a red one",
                             clip=fake, dino=fake, progress=False)
    from conceptkit.evaluate.base import write_json

    write_json(result, tmp_path / "images.json")
    assert main(["report", str(tmp_path / "images.json"), "--out", str(tmp_path / "page")]) == 0
    page = (tmp_path / "page" / "index.html").read_text()
    assert "evaluate images: images.json" in page
    assert "0.250 ± 0.250" in page  # CLIP-I: red 0.5, green 0 -> mean 0.25, se 0.25
    assert "<td>1.png</td><td>a red one</td><td>0.000</td>" in page


def test_ui_learn_job_is_scored_when_clip_and_dino_are_set(tmp_path, clip_dir, dino_dir):
    """`conceptkit ui --clip --dino`: a TI/LoRA Learn job ends with `evaluate images` on its final validation
    images against the uploads, and the finished job shows the scores."""
    pytest.importorskip("gradio")
    import sys
    import time

    from conceptkit.evaluate.base import write_json
    from conceptkit.ui.app import UI
    from conceptkit.ui.jobs import JobQueue

    queue = JobQueue(tmp_path / "jobs", program=(sys.executable, "-c", "pass"))  # each command: a no-op
    upload = folder_of(tmp_path / "up", [solid(RED)]) / "0.png"
    ui = UI(queue, tmp_path, ["toy"], clip=str(clip_dir), dino=str(dino_dir))
    ui.start_learn("toy", "Textual Inversion", [str(upload)], "<mine>", "object", 20, 0)
    job = queue.list()[0]
    assert job.commands[1][:2] == ["evaluate", "images"]
    args = dict(zip(job.commands[1][2::2], job.commands[1][3::2]))
    assert args["--images"] == f"{job.out}/validation/step-000020" and args["--reference"].endswith("/images")
    assert (args["--clip"], args["--dino"]) == (str(clip_dir), str(dino_dir))
    for _ in range(200):
        if queue.get(job.id).status == "done":
            break
        time.sleep(0.05)
    fake = ColourEncoder()
    write_json(evaluate_images(folder_of(tmp_path / "v", [solid(RED)]), tmp_path / "v", prompt="a red one", clip=fake,
                               dino=fake, progress=False), job.out / args["--json"].split("/")[-1])
    panel = ui.learn_panel(job.id)[-1]
    assert "**Scores**" in panel and "| 1 | 1 | 1.000 | 1.000 | 1.000 |" in panel
    # without --clip/--dino the job is the learn command alone
    plain = UI(queue, tmp_path, ["toy"])
    plain.start_learn("toy", "LoRA", [str(upload)], "zq", "object", 20, 0)
    assert [len(j.commands) for j in queue.list() if j.kind == "lora"] == [1]
    assert "--pivotal-steps" not in queue.list()[0].commands[0]  # (newest first)
    # the pivotal method: the same command, the trigger learned first as a word
    plain.start_learn("toy", "LoRA, its trigger learned first as a word (pivotal)", [str(upload)], "<zq>", "star",
                      20, 0)
    command = queue.list()[0].commands[0]
    assert command[command.index("--pivotal-steps") + 1] == "600" and "--trigger=<zq>" in command


def test_renders_and_showcase_grids_record_settings(tmp_path):
    from conceptkit.evaluate.ti import write_showcase
    from conceptkit.shapes.concepts import write_concept
    from conceptkit.shapes.dataset import write_image_folder
    import random

    from conceptkit.shapes.captions import caption
    from conceptkit.shapes.world import sample_scene

    concept = by_name("pink-checkered-cross")
    folder = write_concept(concept, tmp_path / "concept")
    p = parse_infotext(read_parameters(folder / "0.png"))
    assert p["prompt"] == "a large pink checkered cross in the center, on a gray background"
    assert (p["Model"], p["Size"]) == ("shapes-world renderer", "64x64")
    scene = sample_scene(random.Random(0))
    write_image_folder(tmp_path / "data", [scene])
    rendered = parse_infotext(read_parameters(tmp_path / "data" / "000000.png"))
    assert (rendered["prompt"], rendered["Model"]) == (caption(scene), "shapes-world renderer")
    images = tmp_path / "images"
    folder_of(images, [solid(RED, (64, 64))] * 6)
    write_showcase([(concept, images)], 1, tmp_path / "grid.png",
                   Settings(prompt="", steps=30, sampler="ddim", cfg_scale=7.5, seed=1000000, model="toy"))
    g = parse_infotext(read_parameters(tmp_path / "grid.png"))
    assert g["prompt"].startswith("evaluate ti:") and (g["Steps"], g["Seed"], g["Model"]) == ("30", "1000000", "toy")


def test_composed_pictures_record_method_and_concepts(tmp_path):
    from conceptkit.compose.config import CLoRAConfig
    from conceptkit.compose.run import LoraSpec, compose

    loras = Path(__file__).parents[1] / "src/conceptkit/bundled/loras"
    pipe = load_pipeline("toy")
    compose(pipe, "a {star} on the left and a {cross} on the right, on a gray background",
            [LoraSpec("star", str(loras / "red-striped-star.safetensors")),
             LoraSpec("cross", str(loras / "pink-checkered-cross.safetensors"))],
            methods=["clora", "merge"], seeds=[4], cfg=CLoRAConfig(steps=2, iterative_steps=(), lora_end=0.5,
                                                             guidance_rescale=0.7),
            save_maps=True, out_dir=tmp_path)
    p = parse_infotext(read_parameters(tmp_path / "merge" / "s4.png"))
    assert (p["Method"], p["Seed"], p["Steps"], p["Sampler"], p["LoRA end"]) == ("merge", "4", "2", "DDIM", "0.5")
    assert p["Guidance rescale"] == "0.7"
    assert p["Concepts"] == "star: lora red-striped-star.safetensors, cross: lora pink-checkered-cross.safetensors"
    merged = json.loads((tmp_path / "compose.json").read_text())["merged_prompt"]
    assert p["prompt"] == merged and "{" not in merged  # every concept's phrase in place of its slot
    assert parse_infotext(read_parameters(tmp_path / "clora" / "s4-attention.png"))["Method"] == "clora"
    assert parse_infotext(read_parameters(tmp_path / "grid.png"))["Method"] == "clora"
