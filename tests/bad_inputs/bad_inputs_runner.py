"""Run one case of the malformed-input corpus (cases.json) through the CLI in-process, and judge the outcome.

Shared by tests/test_bad_inputs.py and benchmarks/reliability_inputs.py. Each case runs in its own temporary folder
(also the working directory, so a pickle that ran code would leave its marker file there), with an --out folder that
already holds a file of the user's: after the run that file must be unchanged, and a failing run must add nothing.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = HERE / "files"
CASES = json.loads((HERE / "cases.json").read_text())
MARKER = "conceptkit-bad-input-PWNED"  # what the corpus' pickles would create if they were ever unpickled
USER_FILE = "notes.txt"

# the fewest steps each command can take, so a case that is handled by running costs about a second
FAST = {
    ("generate",): ["--steps", "1", "--num-images", "1"],
    ("compose",): ["--num-images", "1", "--iterative-steps", ""],
    ("learn", "ti"): ["--steps", "1", "--batch", "1", "--token", "<bad-input>", "--no-validation"],
    ("learn", "lora"): ["--steps", "1", "--batch", "1", "--rank", "1", "--no-validation"],
    ("learn", "promptnet"): ["--steps", "1", "--batch", "1", "--copies", "1", "--threads", "1"],
}


@dataclass
class Outcome:
    case: dict
    outcome: str  # "ok", "error" (exit 2, one line) or "crash" (anything else)
    message: str  # the error line, the exception, or ""
    handled: bool
    why: str  # why it does not count as handled ("" when it does)


def command_key(argv: list[str]) -> tuple:
    return tuple(argv[:2]) if argv[0] == "learn" else (argv[0],)


@contextlib.contextmanager
def cached_toy_pipeline():
    """Load the toy model once and hand each case a deep copy (cases mutate pipelines: tokens, adapters)."""
    from conceptkit.models import loading

    original, cache = loading.load_pipeline, {}

    def load(model="toy", *, config=None, dtype=None, device="auto"):
        import torch

        if str(model) != "toy" or config is not None:
            return original(model, config=config, device=device, **({"dtype": dtype} if dtype else {}))
        key = (dtype or torch.float32, device)
        if key not in cache:
            cache[key] = original(model, device=device, **({"dtype": dtype} if dtype else {}))
        return copy.deepcopy(cache[key])

    loading.load_pipeline = load
    try:
        yield
    finally:
        loading.load_pipeline = original


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_case(case: dict, work: Path) -> Outcome:
    """Run `case` with `work` (an empty folder) as working directory; judge it against its expectation."""
    from conceptkit import cli
    from conceptkit.models.loading import toy_model_path

    work = Path(work)
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / USER_FILE).write_text("the user's own file: must survive every run\n")
    for name, text in case.get("out_holds", {}).items():  # e.g. a finished run already in --out
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    values = {"f": str(FILES / case["file"]), "toy": str(toy_model_path()), "out": str(out)}
    argv = [a.replace("{f}", values["f"]).replace("{toy}", values["toy"]) for a in case["argv"]]
    argv += FAST[command_key(argv)] + ["--out", str(out)]
    stdout, stderr = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(argv)
        err = stderr.getvalue()
        error_lines = [line for line in err.splitlines() if line.startswith("error:")]
        if code == 0:
            outcome, message = "ok", ""
        elif code == 2 and len(error_lines) == 1 and "Traceback" not in err:
            outcome, message = "error", error_lines[0]
        else:
            outcome, message = "crash", f"exit code {code}: {err.strip().splitlines()[-1:] or ''}"
    except SystemExit as e:  # argparse refusing the arguments
        outcome, message, err = "crash", f"SystemExit({e.code}): {stderr.getvalue().strip()[-200:]}", stderr.getvalue()
    except Exception as e:  # noqa: BLE001 - a crash is exactly what we are looking for
        tb = traceback.extract_tb(e.__traceback__)[-1]
        outcome, message, err = "crash", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''} " \
                                         f"({Path(tb.filename).name}:{tb.lineno})", stderr.getvalue()
    finally:
        os.chdir(cwd)
    why = []
    if outcome != case["expect"]:
        why.append(f"expected {case['expect']}, got {outcome}")
    if outcome == "error" and case.get("names") and case["names"].lower() not in message.lower():
        why.append(f"message does not name {case['names']!r}")
    if outcome == "error" and (len(message) > 600 or "\n" in message):
        why.append("message longer than one line")
    if case.get("stderr") and case["stderr"].lower() not in err.lower():
        why.append(f"no {case['stderr']!r} on stderr")
    if (work / MARKER).exists():
        why.append("a pickle ran code")
    after = snapshot(out)
    if any(after.get(k) != v for k, v in before.items()):
        why.append("the user's file in --out was changed")
    if outcome != "ok" and after != before:
        why.append(f"a failed run wrote into --out: {sorted(set(after) - set(before))[:3]}")
    return Outcome(case, outcome, message, not why, "; ".join(why))
