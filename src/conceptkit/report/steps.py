"""Steps that run the `conceptkit` command line as a subprocess, so the command a report shows is what ran.

A finished step leaves `demo-step.json` (its arguments and time) in its output folder. Running the steps again
reuses a finished step whose arguments are unchanged; a step that has to run deletes its folder first (no stale
files), and every step after it in the same chain runs too (it may depend on what changed).
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_text

RECORD = "demo-step.json"


def program() -> tuple[list[str], str]:
    """(how to start conceptkit, how the page writes it): the entry point beside this Python, else `-m`."""
    entry = Path(sys.executable).parent / "conceptkit"
    if entry.is_file():
        return [str(entry)], "conceptkit"
    return [sys.executable, "-m", "conceptkit.cli"], "python -m conceptkit.cli"


def shown(path: str | Path) -> str:
    """A path as a command shows it: relative to the working directory when inside it."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(resolved)


def shell(words: list[str], width: int = 90) -> str:
    """A shell command line; an option and its values stay together, and lines longer than `width` are broken
    before an option with a backslash-newline."""
    groups: list[list[str]] = []
    for word in words:
        if word.startswith("--") or not groups:
            groups.append([])
        groups[-1].append(shlex.quote(word))
    lines = [" ".join(groups[0])]
    for group in groups[1:]:
        text = " ".join(group)
        if len(lines[-1]) + 1 + len(text) > width:
            lines.append(text)
        else:
            lines[-1] += " " + text
    return " \\\n    ".join(lines)


@dataclass
class Step:
    name: str
    args: list[str]  # conceptkit's arguments
    out: Path  # the folder the step writes; deleted before it runs
    seconds: float = 0.0
    reused: bool = False

    @property
    def command(self) -> str:
        return shell([program()[1], *self.args])


def run_chain(steps: list[Step], *, fresh: bool = False) -> list[Step]:
    stale = fresh
    for step in steps:
        record = step.out / RECORD
        previous = json.loads(record.read_text()) if record.is_file() else None
        if not stale and previous and previous.get("args") == step.args:
            step.seconds, step.reused = previous["seconds"], True
            print(f"[{step.name}] finished before, reused: {shown(step.out)}", flush=True)
            continue
        stale = True
        if step.out.exists():
            shutil.rmtree(step.out)
        print(f"[{step.name}] $ {step.command}", flush=True)
        began = time.perf_counter()
        code = subprocess.run(program()[0] + step.args).returncode
        if code:
            raise UserError(f"demo step '{step.name}' failed (exit code {code}): {shell([program()[1], *step.args], 10**6)}")
        step.seconds = round(time.perf_counter() - began, 1)
        atomic_write_text(record, json.dumps({"args": step.args, "seconds": step.seconds,
                                              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
    return steps
