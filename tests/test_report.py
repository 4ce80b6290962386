"""`conceptkit report` (pages from `evaluate --json` files), the page writer, the demo's step runner and `demo --quick`."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conceptkit.cli import main
from conceptkit.errors import UserError
from conceptkit.evaluate import clora, oracle_accuracy, profusion, ti
from conceptkit.evaluate.base import write_json
from conceptkit.report.evaluations import kind_of, write_report
from conceptkit.report.page import Page, Picture
from conceptkit.report.steps import RECORD, Step, run_chain, shell


def srcs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory):
    """Real JSON of each evaluate command, with tiny settings: base and ti through the command line, the others
    through their functions (their command lines have no way to make them small), written as the CLI writes them."""
    from conceptkit.compose.config import CLoRAConfig
    from conceptkit.learn.promptnet_config import FinetuneConfig
    from conceptkit.learn.ti_config import TIConfig
    from conceptkit.models.loading import load_pipeline
    from conceptkit.shapes.concepts import by_name

    root = tmp_path_factory.mktemp("evaluations")
    files = {k: root / f"{k}.json" for k in ("base", "ti", "clora", "profusion", "oracle")}
    assert main(["evaluate", "base", "--seeds", "1", "--steps", "1", "--json", str(files["base"])]) == 0
    results = ti.evaluate_ti("toy", TIConfig(steps=2, batch=1, validation_prompts=()),
                             concepts=[by_name("pink-checkered-cross")], seeds=1, steps=2, out_dir=root / "ti",
                             progress=False)
    write_json(results, files["ti"])
    pipe = load_pipeline("toy")
    results = clora.evaluate_clora(pipe, CLoRAConfig(steps=2, iterative_steps=()), methods=("clora", "merge"),
                                   seeds=clora.EVAL_SEEDS[:1], progress=False)
    results["model"] = "toy"
    write_json(results, files["clora"])
    results = profusion.evaluate_profusion("toy", methods=("fusion", "plain"), seeds=1, steps=2,
                                           finetune=FinetuneConfig(steps=1, batch=1, copies=2), objects=1,
                                           out_dir=root / "profusion", progress=False)
    write_json(results, files["profusion"])
    write_json(oracle_accuracy.oracle_accuracy(n=4), files["oracle"])
    return files


def test_each_evaluation_is_recognised_by_its_keys(evaluations):
    for kind, path in evaluations.items():
        assert kind_of(json.loads(path.read_text())) == kind
    assert kind_of({"foo": 1}) is None and kind_of([1, 2]) is None


def test_report_shows_the_numbers_each_evaluate_command_prints(evaluations, tmp_path, capsys):
    out = tmp_path / "page"
    assert main(["report", *map(str, evaluations.values()), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {(out / 'index.html').resolve()}"
    page = (out / "index.html").read_text()
    data = {k: json.loads(p.read_text()) for k, p in evaluations.items()}
    for key in ("single.shape", "single.position", "double.both_present"):
        assert f"<td>{key}</td><td>{data['base'][key]:.3f}</td>" in page
    for key in ("ti.fidelity", "ti.adherence", "init_word.fidelity", "text.fidelity"):
        assert f"<strong>{data['ti'][key]:.3f}</strong>" in page
    for m in ("clora", "merge"):
        assert (f"<td>{m}</td><td>{data['clora'][m + '.success']:.3f}</td>"
                f"<td>{data['clora'][m + '.concepts_found']:.3f}</td>") in page
    for pair in data["clora"]["pairs"]:
        assert pair["template"] in page
    for m, name in (("fusion", "fusion sampling (fine-tuned)"), ("plain", "plain sampling (fine-tuned)")):
        assert f"<td>{name}</td><td>{data['profusion'][m + '.preservation']:.3f}</td>" in page
    assert f"<td>color</td><td>{data['oracle']['clean']['color']:.3f}</td>" in page
    # every table the terminal shows, row for row (base: one row per float metric)
    assert page.count("<tr>") >= len([v for v in data["base"].values() if isinstance(v, float)])
    # the command that re-runs an evaluation whose file records every setting, and the one that made the page
    assert f"conceptkit evaluate base --model toy --seeds 1 --steps 1 --guidance-scale 7.5 --scheduler ddim " \
           f"--json {evaluations['base']}" in page
    assert "conceptkit report " + str(evaluations["base"]) in page
    assert "conceptkit evaluate ti" not in page  # sampled with 2 steps: no command line gives that file
    assert page.count("<section") == 6


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("{not json", "not valid JSON (Expecting property name"),
    ('{"accuracy": 0.5, "runs": 3}', "not the JSON of `conceptkit evaluate base|ti|clora|profusion|oracle|images|dreambench --json` "
                                     "(found: accuracy, runs)"),
    ("[1, 2]", "(found: list)"),
    ('{"ti.fidelity": 0.5, "concepts": {}}', "looks like `conceptkit evaluate ti --json` output but is incomplete"),
])
def test_bad_json_is_one_line_naming_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    assert main(["report", str(path), "--out", str(tmp_path / "page")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and message in err
    assert not (tmp_path / "page" / "index.html").exists()
    with pytest.raises(UserError):
        write_report([path], tmp_path / "page", "conceptkit report")


def test_page_escapes_text_and_keeps_its_pictures_inside_its_folder(tmp_path):
    outside = tmp_path / "elsewhere" / "a.png"
    outside.parent.mkdir()
    Image.new("RGB", (64, 64), "red").save(outside)
    inside = tmp_path / "site" / "imgs" / "b.png"
    inside.parent.mkdir(parents=True)
    Image.new("RGB", (300, 40), "blue").save(inside)
    page = Page(tmp_path / "site", "a <b> & c")
    s = page.section("Scores & <pictures>")
    s.text("see `x < y`").pictures([Picture(outside, "<i>one</i>"), Picture(inside, "two")], "row")
    s.table(["what", "score"], [["**all**", 0.12345], ["ok", True]]).command("conceptkit generate --prompt 'a <x>'")
    html = page.write().read_text()
    assert "<b>" not in html and "&lt;b&gt; &amp; c" in html and "<code>x &lt; y</code>" in html
    assert "&lt;i&gt;one&lt;/i&gt;" in html and "conceptkit generate --prompt &#x27;a &lt;x&gt;&#x27;" in html
    assert "<strong>all</strong>" in html and "<td>0.123</td>" in html and '<span class="ok">yes</span>' in html
    links = srcs(html)
    assert links[1] == "imgs/b.png" and links[0].startswith("assets/") and "/" not in links[0][len("assets/"):]
    assert (tmp_path / "site" / links[0]).read_bytes() == outside.read_bytes()
    assert 'width="128"' in html and 'width="300"' in html  # 64 px pictures at 2x, wide ones as they are
    assert sorted(p.name for p in (tmp_path / "site").iterdir()) == ["assets", "imgs", "index.html"]  # no temp files
    with pytest.raises(UserError, match="missing.png does not exist"):
        page.section("x").pictures([Picture(tmp_path / "missing.png")])


def test_steps_run_once_then_reuse_and_rerun_the_rest_of_the_chain_when_one_changes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def chain(n):
        return [Step("a", ["shapes", "sample", "--n", str(n), "--out", "a"], tmp_path / "a"),
                Step("b", ["shapes", "sample", "--n", "1", "--out", "b"], tmp_path / "b")]

    first = run_chain(chain(2))
    assert [s.reused for s in first] == [False, False] and all(s.seconds > 0 for s in first)
    record = json.loads((tmp_path / "a" / RECORD).read_text())
    assert record["args"] == first[0].args and record["seconds"] == first[0].seconds
    assert capsys.readouterr().out.startswith("[a] $ conceptkit shapes sample --n 2 --out a")
    again = run_chain(chain(2))
    assert [s.reused for s in again] == [True, True] and again[0].seconds == first[0].seconds
    (tmp_path / "a" / "stale.txt").write_text("from an older run")
    changed = run_chain(chain(1))  # the first step changed: it runs again, into a clean folder, and so does the next
    assert [s.reused for s in changed] == [False, False]
    assert len(list((tmp_path / "a").glob("*.png"))) == 1 and not (tmp_path / "a" / "stale.txt").exists()
    assert [s.reused for s in run_chain(chain(1), fresh=True)] == [False, False]
    with pytest.raises(UserError, match=r"demo step 'bad' failed \(exit code 2\): conceptkit shapes read missing.png"):
        run_chain([Step("bad", ["shapes", "read", "missing.png"], tmp_path / "bad")])
    assert not (tmp_path / "bad" / RECORD).exists()


def test_shell_lines_are_one_command():
    words = ["conceptkit", "generate", "--prompt", "a 'quoted' <x>", *["--seed", "1"] * 20]
    text = shell(words, width=30)
    assert "\\\n" in text
    assert subprocess.run(["bash", "-c", f"printf '%s\\n' {text}"], capture_output=True, text=True).stdout \
        .splitlines() == words


@pytest.mark.parametrize("module", ["conceptkit", "conceptkit.cli"])
def test_python_m_conceptkit_runs(module):
    out = subprocess.run([sys.executable, "-m", module, "report", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "JSON" in out.stdout
    bad = subprocess.run([sys.executable, "-m", module, "compose", "--prompt", "a {x}", "--lora", "x"],
                         capture_output=True, text=True)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error")]  # (library warnings aside)
    assert bad.returncode == 2 and errors == [bad.stderr.strip().splitlines()[-1]] and "--lora 'x'" in errors[0]


def test_demo_quick_end_to_end(tmp_path):
    """The whole showcase with tiny settings: every picture exists, every score and command is on the page."""
    out = tmp_path / "demo"
    began = time.perf_counter()
    run = subprocess.run([str(Path(sys.executable).parent / "conceptkit"), "demo", "--quick", "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == f"wrote {(out / 'index.html').resolve()}"
    page = (out / "index.html").read_text()
    summary = json.loads((out / "demo.json").read_text())
    links = srcs(page)
    assert len(links) >= 4 + 2 * 6 + 2 * 2 + 1 + 2 * 5
    for link in links:  # relative, inside the folder, and there
        assert not link.startswith("/") and ".." not in link and (out / link).is_file()
    assert any(link.endswith("-attention.png") for link in links) and any(link.endswith("-masks.png") for link in links)
    scores = summary["scores"]
    for value in (scores["ti"]["ti"]["fidelity"], scores["ti"]["text"]["adherence"],
                  scores["clora"]["clora"]["success"], scores["clora"]["merge"]["concepts_found"],
                  scores["profusion"]["fusion"]["preservation"], scores["profusion"]["plain"]["adherence"]):
        assert f"<td>{value:.3f}</td>" in page
    assert len(summary["steps"]) == 6
    for step in summary["steps"]:  # the command shown is the one that ran, as recorded by the step
        folder = Path(step["command"].split("--out ")[-1].split()[0])
        recorded = json.loads((folder / RECORD).read_text())["args"]
        assert shell(["conceptkit", *recorded], 10**6) == step["command"]
        assert shell(["conceptkit", *recorded]).replace("'", "&#x27;").replace("<", "&lt;").replace(">", "&gt;") in page
    for words in ("conceptkit learn ti", "--method clora,merge", "--save-maps", "learn promptnet --finetune",
                  "--fusion", "--no-fusion"):
        assert words in page
    print(f"demo --quick took {time.perf_counter() - began:.1f} s")


def test_rerun_command_of_a_ti_file_gives_back_its_recipe(evaluations):
    """The command the page offers parses into the recipe the file records (and none is offered when it could not)."""
    import shlex
    from dataclasses import asdict

    from conceptkit.cli import build_parser
    from conceptkit.learn.ti_config import TIConfig
    from conceptkit.report.evaluations import rerun_command

    data = json.loads(evaluations["ti"].read_text())
    data["settings"]["steps"] = 30  # what the command line samples with
    recipe = {k: v for k, v in asdict(TIConfig(steps=7, lr=0.01, init_word=None, seed=3)).items() if k != "token"}
    data["settings"]["recipe"] = json.loads(json.dumps(recipe))
    command = rerun_command("ti", data, Path("ti.json"))
    args = build_parser().parse_args(shlex.split(command)[1:])
    given = TIConfig(steps=args.ti_steps, lr=args.lr, batch=args.batch, vectors=args.vectors,
                     init_word=args.init_word or None, seed=args.seed)  # as commands/evaluate.py's run_ti builds it
    assert {k: v for k, v in asdict(given).items() if k != "token"} == recipe
    assert args.concepts == "pink-checkered-cross" and args.seeds == 1 and args.json == "ti.json"
    data["settings"]["recipe"]["template"] = "style"  # not a command-line option of evaluate ti
    assert rerun_command("ti", data, Path("ti.json")) is None
