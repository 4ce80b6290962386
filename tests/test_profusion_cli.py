"""ProFusion on the command line: `learn promptnet` (--pretrain, --export-to, --finetune), `generate --promptnet`
and `evaluate profusion`, end to end on the bundled toy model, and their one-line errors (exit code 2)."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conceptkit.cli import main
from conceptkit.models.loading import load_pipeline
from conceptkit.profusion.saved import UNET_ATTENTION_FILE, load_promptnet
from conceptkit.shapes.dataset import scenes, write_image_folder

PROMPT = "a small S* on the left, on a navy background"
PROMPTNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "image_encoder.json", "promptnet.json")


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module", autouse=True)
def toy():
    """The bundled toy pipeline; loading it first also gets the one-time import warnings out of the way, so the
    captured stderr of every test holds only what the command printed."""
    return load_pipeline("toy", device="cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("domain") / "images", scenes(6, seed=1, p_pair=0))


@pytest.fixture(scope="module")
def pretrained(images, tmp_path_factory):
    """`learn promptnet --pretrain`: the run folder and the exit code."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    code = main(["learn", "promptnet", "--pretrain", "--images", str(images), "--steps", "2", "--batch", "2",
                 "--validate-every", "0", "--latents", "mean", "--pad-prompt", "--out", str(out)])
    return out, code


@pytest.fixture(scope="module")
def exported(pretrained, tmp_path_factory):
    """`learn promptnet --export-to DIR --export-dtype fp16` of the pre-training run."""
    run, code = pretrained
    assert code == 0
    out = tmp_path_factory.mktemp("export") / "promptnet"
    code = main(["learn", "promptnet", "--export-to", str(out), "--export-dtype", "fp16", "--out", str(run)])
    return out, code


@pytest.fixture(scope="module")
def finetuned(exported, images, tmp_path_factory):
    """`learn promptnet --finetune` of the exported PromptNet on one image."""
    export, code = exported
    assert code == 0
    out = tmp_path_factory.mktemp("finetune") / "ft"
    code = main(["learn", "promptnet", "--finetune", "--promptnet", str(export), "--image",
                 str(images / "000000.png"), "--steps", "2", "--out", str(out)])
    return out, code


def generate(promptnet, out, *extra):
    return main(["generate", "--promptnet", str(promptnet), "--prompt", PROMPT, "--steps", "3", "--num-images", "2",
                 "--out", str(out), *extra])


@pytest.fixture(scope="module")
def generated(finetuned, tmp_path_factory):
    """generate with the fine-tuned PromptNet and no --image: twice with fusion (same seed), once --no-fusion."""
    ft, code = finetuned
    assert code == 0
    root = tmp_path_factory.mktemp("generate")
    codes = {name: generate(ft, root / name, *extra)
             for name, extra in (("fusion", ()), ("again", ()), ("plain", ("--no-fusion",)))}
    return root, codes


def pngs(folder):
    """The images a generate run wrote (not the grid), in order."""
    return sorted(p for p in folder.glob("*.png") if p.name != "grid.png")


# ------------------------------------------------------------------------------------ learn promptnet

def test_pretrain_writes_a_promptnet_folder_with_the_settings_given(pretrained, toy):
    run, code = pretrained
    assert code == 0
    for name in PROMPTNET_FILES:
        assert (run / name).is_file(), name
    meta = json.loads((run / "promptnet.json").read_text())
    assert meta["pad_prompt"] is True and meta["latents"] == "mean"
    assert meta["stage"] == "pretrained" and meta["steps"] == 2 and meta["base_model"] == "toy"
    assert meta["num_images"] == 6
    config = json.loads((run / "training.json").read_text())["config"]
    assert (config["kind"], config["steps"], config["batch"], config["validate_every"]) == ("pretrain", 2, 2, 0)
    # --validate-every 0: one validation grid, at the end
    assert [p.name for p in sorted((run / "validation").glob("*.png"))] == ["step-000002.png"]
    assert [p.name for p in sorted((run / "checkpoints").glob("*.safetensors"))] == ["step-000002.safetensors"]
    saved = load_promptnet(run, toy)
    assert saved.unet_attention is None and saved.reference_path is None


def test_pretrain_takes_the_official_commands_options(images, tmp_path):
    out = tmp_path / "run"
    assert main(["learn", "promptnet", "--pretrain", "--images", str(images), "--steps", "2", "--batch", "2",
                 "--no-validation", "--mixed-precision", "bf16", "--gradient-checkpointing", "--ema-decay", "0.99",
                 "--crop", "random", "--out", str(out)]) == 0
    config = json.loads((out / "training.json").read_text())["config"]
    assert (config["mixed_precision"], config["gradient_checkpointing"], config["ema_decay"], config["crop"]) == \
        ("bf16", True, 0.99, "random")
    assert json.loads((out / "promptnet.json").read_text())["weights"] == {"ema_decay": 0.99, "ema_updates": 2}
    with safe_open(out / "checkpoints" / "step-000002.safetensors", "pt") as f:
        assert any(k.startswith("ema/") for k in f.keys())


def test_export_writes_an_fp16_promptnet_folder_of_the_latest_checkpoint(pretrained, exported, toy):
    run, _ = pretrained
    export, code = exported
    assert code == 0
    for name in PROMPTNET_FILES:
        assert (export / name).is_file(), name
    weights = export / "diffusion_pytorch_model.safetensors"
    with safe_open(weights, "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float16}
    meta = json.loads((export / "promptnet.json").read_text())
    assert meta["pad_prompt"] is True and meta["latents"] == "mean" and meta["steps"] == 2
    assert meta["exported_from"].endswith("step-000002.safetensors")
    saved = load_promptnet(export, toy)
    assert saved.meta["stage"] == "pretrained"
    # the exported weights are the run's final (step-2) weights, rounded to fp16, loaded back as float32
    final = load_file(run / "diffusion_pytorch_model.safetensors")
    state = saved.promptnet.state_dict()
    assert state.keys() == final.keys()
    for k, v in final.items():
        assert state[k].dtype == torch.float32
        assert torch.equal(state[k].cpu(), v.half().float()), k


def test_finetune_writes_attention_weights_and_the_reference_and_no_checkpoints(finetuned, images, toy):
    ft, code = finetuned
    assert code == 0
    for name in PROMPTNET_FILES + (UNET_ATTENTION_FILE, "reference.png"):
        assert (ft / name).is_file(), name
    assert not (ft / "checkpoints").exists()
    meta = json.loads((ft / "promptnet.json").read_text())
    # --pad-prompt and --latents not given: as the PromptNet was pre-trained
    assert meta["stage"] == "finetuned" and meta["pad_prompt"] is True and meta["latents"] == "mean"
    # the reference is the given image (64 px already: no resize)
    given = np.asarray(Image.open(images / "000000.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(ft / "reference.png").convert("RGB")), given)
    saved = load_promptnet(ft, toy)
    assert saved.unet_attention and saved.reference_path == ft / "reference.png"
    names = set(saved.unet_attention)
    assert names and all(re.search(r"\.to_[qkv]\.", n) for n in names)
    # the tuned to_q/to_k/to_v moved away from the pipeline's
    unet = dict(toy.unet.named_parameters())
    assert any(not torch.equal(saved.unet_attention[n], unet[n].detach().cpu()) for n in names)


# ------------------------------------------------------------------------------------ generate --promptnet

def test_generate_with_a_finetuned_promptnet_writes_images_and_a_grid(generated):
    root, codes = generated
    assert codes == {"fusion": 0, "again": 0, "plain": 0}
    for name in codes:
        files = pngs(root / name)
        assert len(files) == 2, name
        assert [f.name.rsplit("-", 1)[1] for f in files] == ["s0.png", "s1.png"]
        assert all(Image.open(f).size == (64, 64) for f in files)
        assert Image.open(root / name / "grid.png").size == (128, 64)
        # seed and seed + 1 give different images
        assert files[0].read_bytes() != files[1].read_bytes()


def test_generate_is_reproducible_and_fusion_differs_from_plain(generated):
    root, _ = generated
    fusion, again, plain = (pngs(root / name) for name in ("fusion", "again", "plain"))
    assert [f.read_bytes() for f in fusion] == [f.read_bytes() for f in again]
    for a, b in zip(fusion, plain):
        assert a.read_bytes() != b.read_bytes()


def test_generate_without_image_uses_the_finetuned_reference(finetuned, generated, images, tmp_path):
    ft, _ = finetuned
    root, _ = generated
    # the same reference passed explicitly gives the same images; another image gives other ones
    assert generate(ft, tmp_path / "same", "--image", str(ft / "reference.png")) == 0
    assert [f.read_bytes() for f in pngs(tmp_path / "same")] == [f.read_bytes() for f in pngs(root / "fusion")]
    assert generate(ft, tmp_path / "other", "--image", str(images / "000003.png")) == 0
    assert pngs(tmp_path / "other")[0].read_bytes() != pngs(root / "fusion")[0].read_bytes()


# ------------------------------------------------------------------------------------ one-line errors

@pytest.fixture
def paths(exported, finetuned, images, sd_tiny_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.png").write_bytes(b"not a png")
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "promptnet.json").write_text("{}")
    return {"export": exported[0], "ft": finetuned[0], "png": images / "000000.png", "images": images,
            "corrupt": tmp_path / "x.png", "missing": tmp_path / "missing.png", "empty": tmp_path / "empty",
            "norun": tmp_path / "not-a-run", "sd": sd_tiny_dir, "out": tmp_path / "out"}


LEARN = ["learn", "promptnet"]
GEN = ["generate", "--out", "{out}"]
ERRORS = {
    "both-stages": (LEARN + ["--pretrain", "--finetune", "--images", "{images}", "--image", "{png}",
                             "--out", "{out}"], "exactly one of --pretrain"),
    "neither-stage": (LEARN + ["--out", "{out}"], "exactly one of --pretrain"),
    "pretrain-without-images": (LEARN + ["--pretrain", "--out", "{out}"], "--pretrain needs --images"),
    "finetune-without-image": (LEARN + ["--finetune", "--promptnet", "{export}", "--out", "{out}"],
                               "--finetune needs --image"),
    "caption-without-placeholder": (LEARN + ["--finetune", "--promptnet", "{export}", "--image", "{png}", "--caption",
                                             "a large circle on a gray background", "--out", "{out}"],
                                    "names S\\* 0 times"),
    "caption-with-pretrain": (LEARN + ["--pretrain", "--images", "{images}", "--caption", "a S* on a gray background",
                                       "--out", "{out}"], "--caption: a --finetune option"),
    "finetune-missing-image": (LEARN + ["--finetune", "--promptnet", "{export}", "--image", "{missing}",
                                        "--out", "{out}"], r"missing\.png does not exist"),
    "finetune-corrupt-image": (LEARN + ["--finetune", "--promptnet", "{export}", "--image", "{corrupt}",
                                        "--out", "{out}"], r"cannot read .*x\.png as an image"),
    "generate-missing-image": (GEN + ["--promptnet", "{export}", "--image", "{missing}", "--prompt", "S*"],
                               r"missing\.png does not exist"),
    "generate-corrupt-image": (GEN + ["--promptnet", "{export}", "--image", "{corrupt}", "--prompt", "S*"],
                               r"cannot read .*x\.png as an image"),
    "pretrained-without-image": (GEN + ["--promptnet", "{export}", "--prompt", "S*"], "no reference image"),
    "prompt-without-placeholder": (GEN + ["--promptnet", "{ft}", "--prompt", "a circle on a navy background"],
                                   "names S\\* 0 times"),
    "prompt-placeholder-twice": (GEN + ["--promptnet", "{ft}", "--prompt", "S* next to S*"], "names S\\* 2 times"),
    "refine-eta-2": (GEN + ["--promptnet", "{ft}", "--prompt", "S*", "--refine-eta", "2"], r"--refine-eta 2: pass a number from 0"),
    "scheduler-euler": (GEN + ["--promptnet", "{ft}", "--prompt", "S*", "--scheduler", "euler"],
                        "--scheduler euler: ProFusion samples with DDIM"),
    "not-a-promptnet": (GEN + ["--promptnet", "{empty}", "--image", "{png}", "--prompt", "S*"],
                        "is not a PromptNet folder"),
    "finetune-not-a-promptnet": (LEARN + ["--finetune", "--promptnet", "{empty}", "--image", "{png}",
                                          "--out", "{out}"], "is not a PromptNet folder"),
    "other-architecture": (GEN + ["--model", "{sd}", "--promptnet", "{export}", "--image", "{png}", "--prompt", "S*"],
                           "was built for a UNet with .*pass the --model it was trained for"),
    "finetune-other-architecture": (LEARN + ["--finetune", "--model", "{sd}", "--promptnet", "{export}",
                                             "--image", "{png}", "--out", "{out}"], "was built for a UNet with"),
    "no-bundled-promptnet": (GEN + ["--model", "{sd}", "--image", "{png}", "--prompt", "S*"],
                             "no PromptNet ships for --model .*pass --promptnet DIR"),
    "finetune-no-bundled-promptnet": (LEARN + ["--finetune", "--model", "{sd}", "--image", "{png}", "--out", "{out}"],
                                      "no PromptNet ships for --model"),
    "export-without-checkpoints": (LEARN + ["--export-to", "{out}", "--out", "{norun}"],
                                   "holds no pre-training checkpoint"),
    "export-a-finetuned-folder": (LEARN + ["--export-to", "{out}", "--out", "{ft}"],
                                  "holds no pre-training checkpoint"),
    "evaluate-bogus-method": (["evaluate", "profusion", "--methods", "fusion,bogus", "--out", "{out}"],
                              "unknown method 'bogus'"),
    "extra-image-zero-weight": (GEN + ["--promptnet", "{ft}", "--prompt", "S*", "--extra-image", "{png}:0"],
                                r"--extra-image .*000000\.png:0: the weight after ':' must be a number > 0"),
    "extra-image-text-weight": (GEN + ["--promptnet", "{ft}", "--prompt", "S*", "--extra-image", "{png}:big"],
                                "the weight after ':' must be a number > 0"),
    "extra-image-missing": (GEN + ["--promptnet", "{ft}", "--prompt", "S*", "--extra-image", "{missing}"],
                            r"missing\.png does not exist"),
    "start-timestep-euler": (GEN + ["--promptnet", "{ft}", "--prompt", "S*", "--no-fusion", "--scheduler", "euler",
                                    "--start-timestep", "500"], "--start-timestep 500 with --scheduler euler: .*ddim"),
    "finetune-with-pretrain-options": (LEARN + ["--finetune", "--promptnet", "{export}", "--image", "{png}",
                                                "--ema-decay", "0.9", "--gradient-checkpointing", "--crop", "center",
                                                "--out", "{out}"],
                                       "--crop, --gradient-checkpointing, --ema-decay: --pretrain options"),
    "start-timestep-plain-generate": (GEN + ["--prompt", "a circle", "--start-timestep", "500"],
                                      "are ProFusion options: pass --promptnet DIR or --image FILE"),
    "lora-end-with-an-image": (GEN + ["--promptnet", "{ft}", "--prompt", "S*", "--lora-end", "0.5"],
                               "--lora-end works with plain sampling"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_with_exit_code_2(case, paths, capsys):
    template, pattern = ERRORS[case]
    argv = [a.format(**paths) for a in template]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert not paths["out"].exists()  # nothing written


# ------------------------------------------------------------------------------------ evaluate profusion

EVALUATE = ["evaluate", "profusion", "--objects", "1", "--seeds", "1", "--steps", "3"]


@pytest.fixture(scope="module")
def evaluated(exported, tmp_path_factory):
    export, code = exported
    assert code == 0
    root = tmp_path_factory.mktemp("evaluate")
    test = main(EVALUATE + ["--promptnet", str(export), "--finetune-steps", "2",
                            "--methods", "fusion,plain,pretrained", "--ref-prompt", "a photo of an object",
                            "--json", str(root / "out.json"),
                            "--out", str(root / "test")])
    tune = main(EVALUATE + ["--promptnet", str(export), "--split", "tune", "--methods", "pretrained",
                            "--json", str(root / "tune.json"), "--out", str(root / "tune")])
    return root, test, tune


def test_evaluate_profusion_writes_scores_timings_and_a_grid(evaluated, exported):
    root, code, _ = evaluated
    assert code == 0
    results = json.loads((root / "out.json").read_text())
    for method in ("fusion", "plain", "pretrained"):
        for key in ("preservation", "adherence"):
            assert 0 <= results[f"{method}.{key}"] <= 1, (method, key)
        assert results[f"{method}.seconds"] > 0, method
    assert not any(k.startswith(("pretrained_plain.", "ti.")) for k in results)
    assert results["finetune_seconds"] > 0
    settings = results["settings"]
    assert settings["split"] == "test" and settings["steps"] == 3 and len(settings["seeds"]) == 1
    assert settings["promptnet"] == str(exported[0])
    assert settings["fusion"]["ref_prompt"] == "a photo of an object" and settings["plain"]["ref_prompt"] is None
    assert (root / "test" / "grid.png").is_file()
    (name,) = [p.name for p in (root / "test").iterdir() if p.is_dir()]
    assert list(results["objects"]) == [name]
    # the fine-tuned PromptNet and one image per prompt (the default "moved" set: 5 compositional prompts and 4
    # two-object ones, 1 seed) per method
    assert (root / "test" / name / "promptnet" / UNET_ATTENTION_FILE).is_file()
    for method in ("fusion", "plain", "pretrained"):
        assert len(pngs(root / "test" / name / method)) == 9, method
    assert settings["prompt_set"] == "moved" and len(settings["prompts_per_object"][name]) == 9
    assert sum(" and " in p for p in settings["prompts_per_object"][name]) == 4
    # preservation + adherence with its standard errors (None: one object and one seed is one unit), and the paired
    # differences of fusion and the other methods
    for method in ("fusion", "plain", "pretrained"):
        assert results[f"{method}.sum"] == pytest.approx(results[f"{method}.preservation"]
                                                         + results[f"{method}.adherence"], abs=2e-4)
        assert results[f"{method}.sum_se"] is None and results[f"{method}.sum_se_objects"] is None
        assert 0 <= results[f"{method}.adherence_second"] <= 1
    for other in ("plain", "pretrained"):
        assert results[f"fusion-{other}.sum_diff"] == pytest.approx(results["fusion.sum"] - results[f"{other}.sum"],
                                                                    abs=2e-4)
    assert results["standard_errors"]["units"] == 1
    assert set(results["prompts"]) == set(settings["prompts"])


def test_evaluate_profusion_tune_split_uses_other_objects_and_seeds(evaluated):
    root, test_code, code = evaluated
    assert test_code == 0 and code == 0
    test = json.loads((root / "out.json").read_text())
    tune = json.loads((root / "tune.json").read_text())
    assert tune["settings"]["split"] == "tune"
    test_objects = {p.name for p in (root / "test").iterdir() if p.is_dir()}
    tune_objects = {p.name for p in (root / "tune").iterdir() if p.is_dir()}
    assert len(test_objects) == len(tune_objects) == 1 and not test_objects & tune_objects
    assert set(tune["objects"]) == tune_objects
    assert not set(test["settings"]["seeds"]) & set(tune["settings"]["seeds"])
    # no fine-tuning for the pre-trained method alone
    assert not any((root / "tune" / name / "promptnet").exists() for name in tune_objects)
    assert "finetune_seconds" not in tune


@pytest.fixture(scope="module")
def swept(exported, tmp_path_factory):
    """`evaluate profusion --sweep` over w2 x r (4 settings, one of them the same images as another), with each
    fine-tune counted."""
    import conceptkit.evaluate.profusion as module

    export, code = exported
    assert code == 0
    root = tmp_path_factory.mktemp("sweep")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        real = module.finetune_promptnet
        mp.setattr(module, "finetune_promptnet", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
        code = main(["evaluate", "profusion", "--objects", "2", "--seeds", "1", "--steps", "2", "--promptnet",
                     str(export), "--finetune-steps", "1", "--prompts", "compositional", "--sweep", "w2=0,3",
                     "--sweep", "ref_prompt=none,a photo of an object", "--json", str(root / "sweep.json"),
                     "--out", str(root / "out")])
    return root, code, calls


def test_evaluate_profusion_sweep_fine_tunes_once_per_object_and_samples_each_setting(swept):
    root, code, calls = swept
    assert code == 0
    results = json.loads((root / "sweep.json").read_text())
    assert results["settings"]["split"] == "tune"  # the default with --sweep
    assert len(calls) == 2 == len(results["finetune_seconds_per_object"])  # one fine-tune per object, reused
    assert results["finetune_seconds"] > 0
    sweep = results["sweep"]
    assert [s["setting"] for s in sweep] == [
        {"ref_guidance_scale": 0.0, "ref_prompt": None}, {"ref_guidance_scale": 0.0, "ref_prompt": "a photo of an object"},
        {"ref_guidance_scale": 3.0, "ref_prompt": None}, {"ref_guidance_scale": 3.0, "ref_prompt": "a photo of an object"}]
    # w2 = 0 has no reference branch: the second setting is the first one's images, sampled once
    assert [s["same_as"] for s in sweep] == [None, 1, None, None]
    assert sweep[1]["sum"] == sweep[0]["sum"] and sweep[3]["fusion"]["ref_prompt"] == "a photo of an object"
    for name in results["finetune_seconds_per_object"]:
        folder = root / "out" / name
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["plain", "promptnet", "sweep-1", "sweep-3",
                                                                          "sweep-4"]
        assert len(pngs(folder / "sweep-4")) == 5
    for s in sweep:
        assert s["sum"] == pytest.approx(s["preservation"] + s["adherence"], abs=2e-4)
        assert s["plain_sum_diff"] == pytest.approx(s["sum"] - results["plain.sum"], abs=2e-4)
        assert s["sum_se"] is not None  # two objects x one seed: two units
    from conceptkit.evaluate.profusion import table

    text = table(results)
    assert "#2 w2=0 r=\"a photo of an object\" (= #1)" in text and "plain sampling (fine-tuned), the baseline" in text


def test_generate_uses_the_settings_a_promptnet_folder_recommends(finetuned, generated, tmp_path):
    """promptnet.json `fusion_settings` replace the notebook's fusion call as generate's defaults."""
    ft, _ = finetuned
    root, _ = generated
    copy = tmp_path / "ft"
    shutil.copytree(ft, copy)
    meta = json.loads((copy / "promptnet.json").read_text())
    meta["fusion_settings"] = {"refine_steps": 0, "ref_guidance_scale": 0.0, "guidance_scale": 5.0}
    (copy / "promptnet.json").write_text(json.dumps(meta))
    # with those, "fusion" is exactly the plain sampling of --no-fusion
    assert generate(copy, tmp_path / "recommended") == 0
    assert [f.read_bytes() for f in pngs(tmp_path / "recommended")] == [f.read_bytes() for f in pngs(root / "plain")]
    # and an explicit option still wins over the recommendation
    assert generate(copy, tmp_path / "explicit", "--refine-steps", "1") == 0
    assert pngs(tmp_path / "explicit")[0].read_bytes() != pngs(root / "plain")[0].read_bytes()


# ------------------------------------------------------------------------------------ generate's fusion options

FUSION_OPTIONS = {"guidance_scale": "guidance_scale", "ref_guidance_scale": "ref_guidance_scale",
                  "refine_steps": "refine_steps", "refine_eta": "refine_eta", "refine_emb_scale": "refine_emb_scale",
                  "refine_guidance_scale": "refine_guidance", "emb_scale": "emb_scale"}  # FusionConfig field: dest


def generate_options():
    from conceptkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["generate"]._actions}


def stated_defaults(dest: str) -> dict:
    """What `generate --help` says the option's default is: for the bundled PromptNet, for a folder that recommends
    nothing (the notebook's fusion call), and with --no-fusion (when it says)."""
    text = " ".join(generate_options()[dest].help.split())
    no_fusion = re.search(r"--no-fusion: ([\d.]+)", text)
    bundled = float(re.search(r"([\d.]+) for the bundled PromptNet", text)[1])
    return {"bundled": bundled,
            "notebook": float(re.search(r"else ([\d.]+) as in the notebook's fusion call", text)[1]),
            "no_fusion": float(no_fusion[1]) if no_fusion else bundled if "the same with --no-fusion" in text
            else None}


def test_generate_help_states_the_fusion_defaults_that_apply(toy):
    from conceptkit.models.loading import BUNDLED_PROMPTNET
    from conceptkit.profusion.sampling import FusionConfig, recommended_fusion, recommended_plain

    saved = load_promptnet(BUNDLED_PROMPTNET, toy)
    applied = recommended_fusion(saved)
    for field, dest in FUSION_OPTIONS.items():
        stated = stated_defaults(dest)
        assert stated["bundled"] == getattr(applied, field), field
        assert stated["notebook"] == getattr(FusionConfig(), field), field
        plain = getattr(recommended_plain(saved), field)
        assert (stated["no_fusion"] if stated["no_fusion"] is not None else stated["notebook"]) == plain, field
    # the bundled PromptNet recommends its own w_f and w2: the old help's "default 7" and "default 5" were wrong
    assert (applied.refine_guidance_scale, applied.ref_guidance_scale) != (FusionConfig().refine_guidance_scale,
                                                                           FusionConfig().ref_guidance_scale)


@pytest.fixture(scope="module")
def bundled_runs(images, tmp_path_factory):
    """generate --image with the bundled PromptNet: defaults; the defaults --help states, given explicitly; an
    extra image; a start from the reference noised to t = 300."""
    root = tmp_path_factory.mktemp("bundled")
    explicit = []
    for field, dest in FUSION_OPTIONS.items():
        explicit += [f"--{dest.replace('_', '-')}", f"{stated_defaults(dest)['bundled']:g}"]
    base = ["generate", "--image", str(images / "000000.png"), "--prompt", PROMPT, "--steps", "4"]
    runs = {"default": [], "explicit": explicit, "extra": ["--extra-image", f"{images / '000001.png'}:2"],
            "start": ["--start-timestep", "300"]}
    return {name: (main(base + extra + ["--out", str(root / name)]), root / name) for name, extra in runs.items()}


def pixels(folder):
    (path,) = pngs(folder)
    return np.asarray(Image.open(path)).astype(np.float64)


def test_generate_defaults_are_the_values_help_states(bundled_runs):
    assert bundled_runs["default"][0] == bundled_runs["explicit"][0] == 0
    assert np.array_equal(pixels(bundled_runs["default"][1]), pixels(bundled_runs["explicit"][1]))


def test_an_extra_image_changes_the_images(bundled_runs):
    assert bundled_runs["extra"][0] == 0
    assert np.abs(pixels(bundled_runs["extra"][1]) - pixels(bundled_runs["default"][1])).max() > 10
    info = Image.open(pngs(bundled_runs["extra"][1])[0]).text["parameters"]
    assert "Extra image weights: 2" in info


def test_a_start_from_the_noised_reference_stays_close_to_it(bundled_runs, images):
    assert bundled_runs["start"][0] == 0
    reference = np.asarray(Image.open(images / "000000.png").convert("RGB").resize((64, 64))).astype(np.float64)
    started = np.abs(pixels(bundled_runs["start"][1]) - reference).mean()
    from_noise = np.abs(pixels(bundled_runs["default"][1]) - reference).mean()
    # same seed and prompt: ignoring the option would give the from-noise image itself. How near a t = 300 start
    # stays depends on how far the PromptNet follows the prompt away from the reference (mean abs pixel difference
    # 6.5 with the fixed-prompt PromptNet, 13.4 with the captioned one; 20 from noise with either), so no ratio is
    # claimed here; test_profusion.py checks the noised start itself exactly
    assert started < from_noise, (started, from_noise)
    assert "Start timestep: 300" in Image.open(pngs(bundled_runs["start"][1])[0]).text["parameters"]


def test_the_bundled_promptnet_loads_for_the_bundled_model_and_is_small(toy, tmp_path):
    from conceptkit.profusion.sampling import recommended_fusion
    from conceptkit.learn.images import load_reference_image
    from conceptkit.models.loading import BUNDLED_PROMPTNET

    files = list(BUNDLED_PROMPTNET.iterdir())
    assert sum(f.stat().st_size for f in files) < 50e6
    with safe_open(BUNDLED_PROMPTNET / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    saved = load_promptnet(BUNDLED_PROMPTNET, toy)
    assert saved.meta["stage"] == "pretrained" and saved.unet_attention is None
    assert saved.meta["latents"] == "mean" and saved.meta["pad_prompt"] is True
    assert recommended_fusion(saved).ref_guidance_scale == 0.0  # its model card explains why
    # two different objects give two different words of the text encoder's width
    scenes_ = scenes(2, seed=3, p_pair=0)
    folder = write_image_folder(tmp_path / "objects", scenes_)
    words = []
    for name in ("000000.png", "000001.png"):
        image = load_reference_image(folder / name, 64)
        with torch.no_grad():
            latent = toy.vae.encode(image).latent_dist.mean
            tokens = saved.image_encoder(image, latent)
            words.append(saved.promptnet(latent, torch.tensor([500]), tokens, torch.randn(1, 4, 16, 16)))
    assert words[0].shape == (1, 1, toy.text_encoder.get_input_embeddings().weight.shape[1])
    assert not torch.allclose(words[0], words[1])
