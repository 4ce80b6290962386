"""Start-up (issue 21): a command imports only what it uses. `--help` and `shapes read` import none of torch,
diffusers, transformers and peft; `info` imports torch (the device) but reads the others' versions from their
installed metadata. Each command runs in a fresh interpreter, which then lists the heavy modules it loaded."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "gradio")
SRC = Path(__file__).resolve().parents[1] / "src"

PROBE = """
import json, runpy, sys
sys.argv = ["conceptkit", *json.loads(sys.argv[1])]
try:
    runpy.run_module("conceptkit", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print("\\nHEAVY " + json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(%r))))
print("EXIT " + json.dumps(code))
"""


def heavy_modules(*args: str) -> tuple[list[str], int, str]:
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,), json.dumps(list(args))], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = done.stdout.splitlines()
    heavy = json.loads(next(l for l in lines if l.startswith("HEAVY "))[6:])
    code = json.loads(next(l for l in lines if l.startswith("EXIT "))[5:])
    return heavy, code, done.stdout + done.stderr


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["learn", "ti", "--help"]])
def test_help_imports_no_torch(args):
    heavy, code, out = heavy_modules(*args)
    assert code == 0 and "usage: conceptkit" in out
    assert heavy == []


def test_shapes_read_imports_no_torch(tmp_path):
    from conceptkit.shapes.render import render
    from conceptkit.shapes.world import Obj, Scene
    from PIL import Image

    path = tmp_path / "scene.png"
    Image.fromarray(render(Scene("navy", (Obj("star", "red", "striped", "center", "large"),), ((0, 0),)))).save(path)
    heavy, code, out = heavy_modules("shapes", "read", str(path))
    assert code in (0, None) and '"shape": "star"' in out
    assert heavy == []


def test_info_imports_torch_only_and_reports_the_installed_versions():
    heavy, code, out = heavy_modules("info")
    assert code in (0, None)
    assert heavy == ["torch"]
    info = json.loads(out[: out.index("\nHEAVY ")])
    import diffusers
    import peft
    import transformers

    assert (info["diffusers"], info["transformers"], info["peft"]) == (
        diffusers.__version__, transformers.__version__, peft.__version__)


@pytest.mark.parametrize("args, error", [
    (["generate", "--out", "OUT"], "no prompt given"),
    (["generate", "--prompt", "a star", "--model", "MISSING", "--out", "OUT"], "not a diffusers folder"),
    (["generate", "--prompt-file", "MISSING", "--out", "OUT"], "does not exist"),
    (["learn", "ti", "--images", "MISSING", "--token", "<s1>", "--out", "OUT"], "does not exist"),
    (["learn", "lora", "--images", "MISSING", "--out", "OUT"], "does not exist"),
])
def test_a_mistake_is_refused_before_torch_loads(args, error, tmp_path):
    """A command that needs torch checks its options first: a mistake costs a tenth of a second, not the seconds of
    loading torch and diffusers."""
    args = [str(tmp_path / a) if a in ("OUT", "MISSING") else a for a in args]
    heavy, code, out = heavy_modules(*args)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and error in errors[0], out
    assert heavy == []
