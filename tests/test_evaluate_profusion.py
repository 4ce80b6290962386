"""`evaluate profusion`'s benchmark without a model: the prompts that move the object away from its reference, the
oracle's scoring of them on rendered scenes whose answer is known, the standard errors, the table, and the
--sweep grid and its one-line refusals."""
import math

import pytest

from conceptkit.cli import main
from conceptkit.errors import UserError
from conceptkit.evaluate import profusion as pf
from conceptkit.evaluate.profusion_sweep import effective, grid, label, parse_sweep
from conceptkit.profusion.fusion_config import FusionConfig
from conceptkit.shapes import oracle
from conceptkit.shapes.render import render
from conceptkit.shapes.world import HELD_OUT_TRIPLES, Obj, Scene

TRIPLE = pf.TEST_TRIPLES[0]


def two_object_prompt(side: str) -> pf.BenchPrompt:
    return next(p for p in pf.bench_prompts(TRIPLE) if "second" in p.requested and p.requested["position"] == side)


def scene(background, *objs) -> Scene:
    return Scene(background, tuple(objs), tuple((0, 0) for _ in objs))


# ------------------------------------------------------------------------------------ prompts

def test_the_moved_set_adds_two_object_prompts_in_the_pair_caption_form():
    compositional = pf.bench_prompts(TRIPLE, "compositional")
    moved = pf.bench_prompts(TRIPLE, "moved")
    assert [p.text for p in moved[:5]] == [p.text for p in compositional] and len(compositional) == 5
    two = moved[5:]
    assert len(two) == 4
    assert {p.requested["position"] for p in two} == {"left", "right"}
    assert all(p.requested["background"] != "gray" for p in two)  # the reference's background is gray
    for p in two:
        second = p.requested["second"]
        assert p.text.count("S*") == 1 and p.text.endswith(f", on a {p.requested['background']} background")
        # the canonical pair caption: left object first, "a <colour> <pattern> <shape> on the <side>", no size
        left, right = p.text.split(", on a")[0].split(" and ")
        s_part, o_part = (left, right) if p.requested["position"] == "left" else (right, left)
        assert s_part == f"a S* on the {p.requested['position']}"
        assert o_part.endswith(f"{second.color} {second.pattern} {second.shape} on the {second.position}")
        assert second.position != p.requested["position"]
        # every attribute of the second object differs from the test object's, and it is a training combination
        assert all(a != b for a, b in zip(second.triple, TRIPLE)) and second.triple not in HELD_OUT_TRIPLES
    assert len({p.requested["second"].triple for p in two}) == 4
    assert pf.bench_prompts(TRIPLE) == moved  # deterministic
    with pytest.raises(UserError, match="prompt set 'bogus'"):
        pf.bench_prompts(TRIPLE, "bogus")


# ------------------------------------------------------------------------------------ scoring

def test_two_object_scoring_takes_the_object_at_s_stars_side_not_the_largest():
    p = two_object_prompt("left")
    second = p.requested["second"]
    # the test object small on the left, the second object large on the right: the largest object is the second one
    image = render(scene(p.requested["background"], Obj(*TRIPLE, position="left", size="small"),
                         Obj(*second.triple, position="right", size="large")))
    reading = oracle.read(image)
    assert max(reading.objects, key=lambda o: o.area).shape == second.shape  # what "the largest" would have scored
    row = pf.score(image, TRIPLE, p.requested)
    assert row["preservation"] and row["background"] and row["position"] and row["second"]
    assert pf.adherence_of(row) == 1 and pf.total(row) == 2


def test_two_object_scoring_of_a_swap_and_of_a_missing_second_object():
    p = two_object_prompt("right")
    second = p.requested["second"]
    bg = p.requested["background"]
    right = pf.score(render(scene(bg, Obj(*second.triple, position="left", size="medium"),
                                  Obj(*TRIPLE, position="right", size="medium"))), TRIPLE, p.requested)
    assert all(right[k] for k in ("preservation", "background", "position", "second"))
    # the two objects drawn on the wrong sides: the object at S*'s side is the second one
    swap = pf.score(render(scene(bg, Obj(*TRIPLE, position="left", size="medium"),
                                 Obj(*second.triple, position="right", size="medium"))), TRIPLE, p.requested)
    assert not swap["preservation"] and not swap["second"] and swap["position"] and swap["background"]
    assert swap["second_shape"] is False
    # only the test object, where S* was asked for: kept, but the layout and the second object are missing
    alone = pf.score(render(scene(bg, Obj(*TRIPLE, position="right", size="medium"))), TRIPLE, p.requested)
    assert alone["preservation"] and not alone["position"] and not alone["second"]
    assert pf.adherence_of(alone) == pytest.approx(1 / 3)
    # a wrong background only
    other_bg = "gray" if bg != "gray" else "white"
    wrong = pf.score(render(scene(other_bg, Obj(*second.triple, position="left", size="medium"),
                                  Obj(*TRIPLE, position="right", size="medium"))), TRIPLE, p.requested)
    assert wrong["preservation"] and not wrong["background"] and pf.adherence_of(wrong) == pytest.approx(2 / 3)


def test_one_object_scoring_is_the_largest_object_with_background_position_and_size():
    p = pf.bench_prompts(TRIPLE)[0]  # a large S* on the left, on a brown background
    assert p.requested == {"size": "large", "position": "left", "background": "brown"}
    row = pf.score(render(scene("brown", Obj(*TRIPLE, position="left", size="large"))), TRIPLE, p.requested)
    assert row["preservation"] and pf.adherence_of(row) == 1 and "second" not in row
    small = pf.score(render(scene("brown", Obj(*TRIPLE, position="left", size="small"))), TRIPLE, p.requested)
    assert small["preservation"] and not small["size"] and pf.adherence_of(small) == pytest.approx(2 / 3)
    other = ("square", "red", "plain")
    lost = pf.score(render(scene("brown", Obj(*other, position="left", size="large"))), TRIPLE, p.requested)
    assert not lost["preservation"] and pf.adherence_of(lost) == 1


# ------------------------------------------------------------------------------------ standard errors

def row(obj, seed, prompt, preservation, checks):
    """A scored image: preservation and background/position/size checks."""
    return {"object": obj, "seed": seed, "prompt": prompt, "preservation": preservation,
            **dict(zip(("background", "position", "size"), checks))}


def test_spread_is_over_object_seed_units_and_clustered_by_object():
    # two objects x two seeds x two prompts; totals per image (preservation + adherence):
    rows = [row("a", 0, 0, True, (1, 1, 1)), row("a", 0, 1, False, (1, 1, 1)),   # 2, 1      -> unit 1.5
            row("a", 1, 0, True, (1, 0, 1)), row("a", 1, 1, True, (1, 1, 1)),    # 5/3, 2    -> unit 11/6
            row("b", 0, 0, False, (0, 0, 0)), row("b", 0, 1, False, (1, 0, 0)),  # 0, 1/3    -> unit 1/6
            row("b", 1, 0, False, (1, 1, 0)), row("b", 1, 1, True, (1, 1, 1))]   # 2/3, 2    -> unit 4/3
    units = [1.5, 11 / 6, 1 / 6, 4 / 3]
    mean = sum(units) / 4
    se = math.sqrt(sum((u - mean) ** 2 for u in units) / 3 / 4)
    objects = [(1.5 + 11 / 6) / 2, (1 / 6 + 4 / 3) / 2]
    se_objects = abs(objects[0] - objects[1]) / 2  # two values: sd = |a − b| / √2, / √2
    s = pf.spread(rows)
    assert s["mean"] == pytest.approx(mean) and s["se"] == pytest.approx(se)
    assert s["se_objects"] == pytest.approx(se_objects) and (s["units"], s["objects"]) == (4, 2)
    assert pf.spread(rows[:2])["se"] is None  # one unit: no standard error

    # paired: b = a with one image's preservation lost; the differences are 0 but for one unit
    other = [dict(r) for r in rows]
    other[0]["preservation"] = False
    d = pf.paired(rows, other)
    diffs = [0.5, 0, 0, 0]  # unit means of (a − b)
    assert d["mean"] == pytest.approx(1 / 8)
    assert d["se"] == pytest.approx(math.sqrt(sum((x - 1 / 8) ** 2 for x in diffs) / 3 / 4))
    assert d["se_objects"] == pytest.approx(abs(0.25 - 0) / 2)
    # pairing is by (object, seed, prompt), not by order
    assert pf.paired(rows, list(reversed(other)))["mean"] == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="same"):
        pf.paired(rows, other[:-1])


def test_results_and_table_show_the_sum_its_standard_errors_and_the_paired_difference():
    rows = [row(o, s, k, (o, s, k) != ("a", 0, 0), (1, 1, k == 0)) for o in "ab" for s in (0, 1) for k in (0, 1)]
    plain = [dict(r, preservation=False) for r in rows]
    results = {**pf.method_results("fusion", rows), **pf.method_results("plain", plain),
               **pf.difference_results("fusion-plain", rows, plain), "fusion.seconds": 1.0, "plain.seconds": 0.5,
               "finetune_seconds": 21.5, "finetune_seconds_max": 23.0, "settings": {"threads": 2}}
    assert results["fusion.preservation"] == 0.875 and results["plain.preservation"] == 0
    assert results["fusion.sum"] == pytest.approx(0.875 + 5 / 6, abs=1e-4)
    assert results["fusion-plain.sum_diff"] == 0.875 and results["fusion-plain.preservation_diff"] == 0.875
    assert results["fusion-plain.adherence_diff"] == 0
    assert results["fusion-plain.sum_diff_se"] == pytest.approx(pf.paired(rows, plain)["se"], abs=1e-4)
    assert results["fusion-plain.sum_diff_se"] > 0
    text = pf.table(results)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert all(line.count("|") == lines[0].count("|") for line in lines)  # one table, every row complete
    assert lines[2].startswith(f"| fusion sampling (fine-tuned) | 0.875 |")
    assert f"| {results['fusion.sum']:.3f} | {results['fusion.sum_se']:.3f} |" in lines[2]
    diff = lines[-1]
    z = results["fusion-plain.sum_diff"] / results["fusion-plain.sum_diff_se"]
    assert diff.startswith("| fusion − plain (paired") and f"+0.875 ({z:+.1f} SE)" in diff
    assert "fine-tuning: 21.5 s per object on average, 23.0 s at most (2 threads)" in text
    # one unit: the SEs print as —
    one = {**pf.method_results("fusion", rows[:2]), "fusion.seconds": 1.0}
    assert "| — | — |" in pf.table(one)


# ------------------------------------------------------------------------------------ sweep

def test_sweep_parsing_names_aliases_values_and_the_grid():
    parsed = parse_sweep(["lambda=0.4,0.6", "refine-guidance=5", "r=none,a photo of an object", "m=0,1"])
    assert parsed == [("refine_emb_scale", [0.4, 0.6]), ("refine_guidance_scale", [5.0]),
                      ("ref_prompt", [None, "a photo of an object"]), ("refine_steps", [0, 1])]
    settings = grid(parsed)
    assert len(settings) == 8 and settings[0] == {"refine_emb_scale": 0.4, "refine_guidance_scale": 5.0,
                                                  "ref_prompt": None, "refine_steps": 0}
    assert settings[1]["refine_steps"] == 1  # the last --sweep varies fastest
    assert label(settings[3]) == 'λ=0.4 w_f=5 r="a photo of an object" m=1'
    assert parse_sweep(["w2=0,5", "w_f=3"]) == [("ref_guidance_scale", [0, 5]), ("refine_guidance_scale", [3])]


@pytest.mark.parametrize("texts,message", [
    (["lambda"], r"--sweep lambda: pass KEY=V1,V2,\.\.\. \(KEY one of refine_emb_scale \(λ\)"),
    (["=0.4"], "pass KEY=V1,V2"),
    (["steps=10,20"], "steps is not a fusion setting: pass one of refine_emb_scale"),
    (["lambda=0.4,"], "an empty value"),
    (["lambda=0.4,big"], r"--sweep lambda=0.4,big: big: pass a number from 0 to 100"),
    (["m=1.5"], "1.5: pass an integer from 0"),
    (["eta=2"], "2: pass a number from 0 to 1.414"),
    (["lambda=0.4,0.4"], "0.4 is given twice"),
    (["lambda=0.4", "refine_emb_scale=0.6"], "refine_emb_scale is swept twice"),
    (["lambda=" + ",".join(f"0.{k}" for k in range(1, 10)), "w_f=1,2,3,4,5,6,7,8"], "72 settings .* at most 64"),
    (["r=a | b"], "holds '|'"),
])
def test_sweep_parsing_errors_are_one_line_user_errors(texts, message):
    with pytest.raises(UserError, match=message) as e:
        parse_sweep(texts)
    assert "\n" not in str(e.value)


def test_settings_that_sample_the_same_images_have_the_same_effective_key():
    base = FusionConfig(ref_guidance_scale=0.0)
    with_r = FusionConfig(ref_guidance_scale=0.0, ref_prompt="a photo of an object")
    assert effective(base.__dict__) == effective(with_r.__dict__)  # w2 = 0: no reference branch
    assert effective(FusionConfig(ref_guidance_scale=5.0).__dict__) != effective(
        FusionConfig(ref_guidance_scale=5.0, ref_prompt="a photo of an object").__dict__)
    assert effective(FusionConfig(refine_steps=0, refine_emb_scale=0.4).__dict__) == effective(
        FusionConfig(refine_steps=0, refine_emb_scale=0.8).__dict__)
    assert effective(FusionConfig(refine_emb_scale=0.4).__dict__) != effective(
        FusionConfig(refine_emb_scale=0.8).__dict__)
    assert effective(FusionConfig(ref_prompt="x", class_word="a").__dict__) == effective(
        FusionConfig(ref_prompt="x", class_word="b").__dict__)


@pytest.mark.parametrize("argv,message", [
    (["--sweep", "lambda=0.4,0.6", "--split", "test"], "--sweep with --split test: settings are chosen on the tune "
                                                       "split only"),
    (["--sweep", "lambda=0.4", "--methods", "fusion"], "--sweep with --methods"),
    (["--sweep", "lambda=oops"], "--sweep lambda=oops: oops: pass a number"),
    (["--sweep", "bogus=1"], "bogus is not a fusion setting"),
    (["--prompts", "bogus"], "--prompts: invalid choice: 'bogus'"),
])
def test_evaluate_profusion_refuses_in_one_line_before_anything_loads(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", "profusion", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_sweep_profusion_refuses_the_test_split():
    with pytest.raises(UserError, match="tune split only"):
        pf.sweep_profusion("toy", settings=[{"refine_emb_scale": 0.4}], split="test")


# ------------------------------------------------------------------------------------ composed


def test_composed_gives_the_second_object_its_own_branch_and_samples_the_rest_plainly(tmp_path, monkeypatch):
    """`composed`: each two-object prompt becomes a template with the image and the second object as two concepts
    (S*'s branch never says the second object's colour or pattern); one-object prompts go to plain sampling."""
    from PIL import Image

    import conceptkit.compose.run as compose_run
    from conceptkit.compose.prompts import ConceptSlot, branch_prompts
    from conceptkit.models.loading import load_pipeline
    from conceptkit.profusion.saved import SavedPromptNet

    case = pf.prepare(TRIPLE, tmp_path, 64, "moved")
    calls, plain_calls = [], []
    blank = Image.new("RGB", (64, 64))

    def fake_compose(pipe, template, specs, *, methods, seeds, cfg, promptnet):
        calls.append((template, specs, seeds, cfg, promptnet))
        return type("Composed", (), {"images": {"clora": [blank] * len(seeds)}})()

    def fake_plain(pipe, saved, reference, prompts, cfg, *, seed, num_images, batch_size, progress):
        plain_calls.append((prompts, seed, num_images))
        return type("Out", (), {"images": [blank] * num_images})()

    monkeypatch.setattr(compose_run, "compose", fake_compose)
    monkeypatch.setattr(pf, "generate_profusion", fake_plain)
    saved = SavedPromptNet(None, None, {}, None, tmp_path)
    plain = FusionConfig.plain(steps=30, class_word="object", emb_scale=1.3)
    pipe = type("Pipe", (), {"unet": None})()  # no fine-tuned UNet weights to apply
    images = pf.composed(pipe, saved, case, plain, 2, 100, tmp_path / "out")
    assert len(images) == 2 * len(case.prompts) and len(list((tmp_path / "out").glob("*.png"))) == len(images)
    two = [p for p in case.prompts if "second" in p.requested]
    assert [c[0] for c in calls] == [p.text.replace("S*", "{image}").replace(
        f"{p.requested['second'].color} {p.requested['second'].pattern} {p.requested['second'].shape}", "{second}")
        for p in two]
    assert all("{image}" in c[0] and "{second}" in c[0] and c[2] == [100, 101] for c in calls)
    assert all(c[3].mask_exclusive and c[3].mask_combine == "sum" and c[3].guidance_scale == plain.guidance_scale
               for c in calls)
    assert [pr for pr, _, _ in plain_calls] == [[p.text] for p in case.prompts if "second" not in p.requested]
    # S*'s own branch says none of the second object's words; the second object's branch says all of them
    template, specs = calls[0][0], calls[0][1]
    second = two[0].requested["second"]
    tok = load_pipeline("toy").tokenizer
    slots = [ConceptSlot(s.name, s.text if s.kind == "words" else "S*", s.class_word or "object", s.kind)
             for s in specs]
    bp = branch_prompts(tok, template, slots)
    image_branch = bp.prompts[1 + [s.name for s in specs].index("image")]
    assert second.color not in image_branch and second.pattern not in image_branch
    assert f"{second.color} {second.pattern}" in bp.prompts[1 + [s.name for s in specs].index("second")]
