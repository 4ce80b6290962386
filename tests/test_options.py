"""Every option of every command refuses bad values at parse time in one line (tests/option_sweep.py generates the
cases from the parsers: an option added later is covered without being listed here)."""
from __future__ import annotations

import subprocess
import sys
from collections import defaultdict

import pytest
from option_sweep import ZERO_MEANS, accepted, cases, commands, run_argv, run_case, unchecked_options, value_options

from conceptkit import values
from conceptkit.cli import COMMANDS

CASES = cases()
BY_OPTION = defaultdict(list)
for _case in CASES:
    BY_OPTION[(_case.command, _case.option)].append(_case)


def test_the_walk_reaches_every_command_and_option():
    found = dict(commands())
    top = {path[0] for path in found}
    assert len(top) == len(COMMANDS)  # every registered command, sub-commands unfolded
    assert {("learn", "ti"), ("learn", "lora"), ("learn", "promptnet"), ("evaluate", "dreambench"),
            ("shapes", "train-base"), ("generate",), ("compose",), ("ui",)} <= set(found)
    assert sum(len(value_options(p)) for p in found.values()) == len(BY_OPTION) > 150
    assert sum(c.refuse for c in CASES) > 1000


def test_every_value_option_has_a_checked_type():
    """A bare type=int/float or an unchecked string would let 0, NaN or '' through to the code that runs."""
    assert unchecked_options() == []


def test_zero_exceptions_name_real_options():
    dests = {a.dest for _, p in commands() for a in value_options(p)}
    assert set(ZERO_MEANS) <= dests


@pytest.mark.parametrize("key", sorted(BY_OPTION), ids=lambda k: f"{' '.join(k[0])} {k[1]}")
def test_bad_values_are_refused_in_one_line(key, tmp_path):
    problems = []
    for i, case in enumerate(BY_OPTION[key]):
        if not case.refuse:
            message = accepted(case)
            if message:
                problems.append(f"{case.kind} {case.value!r} is valid ({case.why}) but refused: {message}")
            continue
        folder = tmp_path / str(i)
        folder.mkdir()
        outcome = run_case(case, folder)
        problems += [f"{case.kind} {case.value!r}: {p}" for p in outcome.problems(case)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("argv, line", [
    (["generate", "--prompt", "x", "--steps", "0"], "error: --steps 0: pass an integer from 1 to 1,000,000,000"),
    (["learn", "ti", "--images", "i", "--token", "t", "--out", "o", "--lr", "-1"],
     "error: --lr -1: pass a number > 0 and ≤ 1"),
])
def test_the_two_reported_crashes_end_in_one_line(argv, line, tmp_path):
    """As the user ran them (ZeroDivisionError and Adam's ValueError before), in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "conceptkit", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (2, line + "\n", "")
    assert list(tmp_path.iterdir()) == []


def test_argparse_own_refusals_are_one_line_too(tmp_path):
    for argv, expected in [(["learn", "ti", "--images", "i", "--token", "t", "--out", "o", "--format", "x"],
                            "error: --format: invalid choice: 'x' (choose from 'diffusers', 'a1111')"),
                           (["learn", "ti"], "error: the following arguments are required: --images, --token, --out"),
                           (["generate", "--steps"], "error: --steps: expected one argument")]:
        outcome = run_argv(argv, tmp_path)
        assert (outcome.code, outcome.stderr) == (2, expected + "\n"), argv


def test_scheduler_names_match_the_schedulers():
    from conceptkit.generate.schedulers import SCHEDULERS

    assert values.SCHEDULER_NAMES == tuple(SCHEDULERS)
