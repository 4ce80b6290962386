"""Bad values for every option of every conceptkit command, generated from the parsers themselves, so an option added
later is tried without anyone listing it. Used by tests/test_options.py and benchmarks/reliability_options.py.

For each option that takes a value it tries a wrong type, zero, a negative number, NaN, ±inf, huge numbers and the
empty string, and decides independently of the code under test whether each must be refused:
- a number option (its type carries a `rule`) refuses every value above except 0 where 0 means something (ZERO_MEANS);
- a text option refuses '' except where '' means something (EMPTY_MEANS);
- an option with choices refuses all of them;
- every value-taking option must have one of those checked types (UNCHECKED_TYPE lists none: a bare type=int fails).
A refused value must end in exit code 2, exactly one stderr line `error: ...` naming the option, no traceback,
nothing on stdout and no file written.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from conceptkit import cli

BAD_VALUES = {"wrong type": "abc", "zero": "0", "negative": "-1", "NaN": "nan", "inf": "inf", "-inf": "-inf",
              "huge float": "1e30", "huge int": str(10**30), "empty": ""}
NUMBER_KINDS = tuple(BAD_VALUES)
TEXT_KINDS = ("empty",)

# options (by dest) where 0 is a meaningful setting, and why
ZERO_MEANS = {
    "seed": "seed 0 is a seed",
    "validate_every": "0: validate only at the end",
    "refine_steps": "0: ProFusion without fusion sub-steps (plain sampling)",
    "refine_eta": "η 0: a deterministic fusion sub-step",
    "refine_emb_scale": "λ 0: S* left out of the fusion sub-step",
    "emb_scale": "s 0: S* left out of the main step",
    "guidance_scale": "0: the unconditional prediction",
    "ref_guidance_scale": "0: no reference prompt (what --no-fusion uses)",
    "refine_guidance": "0: unguided fusion sub-step",
    "l2_reg": "0: the official regularisation-free objective (the default)",
    "flip_p": "0: no mirrored images (the default)",
    "p_pair": "0: one-object scenes only",
    "mask_threshold": "0: every pixel where a map is above zero",
    "step_size": "0: a latent update that does not move",
    "max_iter_to_alter": "0: no latent update steps",
    "iterative_steps_steps": "0: no extra refinements",
    "apply_mask_after": "0: mask from the first step (the default)",
    "merge_weight": "0: a merge of nothing, the base model (a baseline)",
    "guidance_rescale": "0: no rescale (the default)",
    "pivotal_steps": "0: no word learned first, a plain LoRA (the default)",
    "reference_pairs": "0: no pair scenes with references (the default)",
}
# options (by dest) where '' is a meaningful setting, and why; their type may be plain str
EMPTY_MEANS = {
    "negative_prompt": "no negative prompt (the default for compose)",
    "init_word": "'' starts from the vocabulary's mean vector (documented)",
    "iterative_steps": "'' for no iterative refinement steps (documented)",
    ("evaluate", "oracle", "model"): "'' tests clean renders only, no VAE (documented)",
}


@dataclass(frozen=True)
class Case:
    command: tuple[str, ...]  # e.g. ("learn", "ti")
    option: str  # "--steps", or a positional's dest
    dest: str
    kind: str  # a key of BAD_VALUES
    value: str
    refuse: bool
    why: str = ""  # for an accepted value: why it is valid

    @property
    def argv(self) -> list[str]:
        value_arg = [f"{self.option}={self.value}"] if self.option.startswith("-") else [self.value]
        return [*self.command, *value_arg]

    @property
    def id(self) -> str:
        return f"{' '.join(self.command)} {self.option} {self.kind}"


def commands(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()):
    """(path, parser) for every runnable command, sub-commands included."""
    parser = parser or cli.build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from commands(child, (*path, name))


def value_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions that take a value (not flags, not --help, not the sub-command choice)."""
    return [a for a in parser._actions if a.nargs != 0 and not isinstance(a, (argparse._HelpAction,
                                                                               argparse._SubParsersAction))]


def empty_means(command: tuple[str, ...], dest: str) -> str | None:
    return EMPTY_MEANS.get((*command, dest)) or EMPTY_MEANS.get(dest)


def cases() -> list[Case]:
    out = []
    for command, parser in commands():
        for action in value_options(parser):
            option = action.option_strings[-1] if action.option_strings else (action.metavar or action.dest)
            rule = getattr(action.type, "rule", None)
            if action.choices is not None:
                kinds = NUMBER_KINDS
            elif rule is not None:
                kinds = NUMBER_KINDS
            else:
                kinds = TEXT_KINDS
            for kind in kinds:
                value = BAD_VALUES[kind]
                why = ""
                if action.choices is not None:
                    why = "one of the choices" if value in action.choices else ""
                elif rule is not None and kind == "zero":
                    why = ZERO_MEANS.get(action.dest, "")
                elif rule is None and kind == "empty":
                    why = empty_means(command, action.dest) or ""
                out.append(Case(command, option, action.dest, kind, value, refuse=not why, why=why))
    return out


def unchecked_options() -> list[str]:
    """Value-taking options with neither a checked type nor choices nor a documented meaning for ''."""
    bad = []
    for command, parser in commands():
        for action in value_options(parser):
            checked = hasattr(action.type, "rule") or action.choices is not None or \
                getattr(action.type, "__module__", "") == "conceptkit.commands.options"
            if not checked and not empty_means(command, action.dest):
                bad.append(f"{' '.join(command)} {action.option_strings or action.dest}")
    return bad


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    written: list[str]
    crash: str = ""

    def problems(self, case: Case) -> list[str]:
        """What is wrong with this outcome for a value that must be refused (empty: nothing)."""
        found = []
        if self.crash:
            return [f"raised {self.crash}"]
        lines = self.stderr.splitlines()
        if self.code != 2:
            found.append(f"exit code {self.code}")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            found.append(f"stderr is not one 'error:' line: {self.stderr!r}")
        elif case.option not in lines[0]:
            found.append(f"the line does not name {case.option}: {lines[0]!r}")
        if "Traceback" in self.stderr:
            found.append("traceback")
        if self.stdout:
            found.append(f"stdout {self.stdout[:80]!r}")
        if self.written:
            found.append(f"wrote {self.written}")
        return found


def run_case(case: Case, folder: Path) -> Outcome:
    return run_argv(case.argv, folder)


def run_argv(argv: list[str], folder: Path) -> Outcome:
    """cli.main(argv) with `folder` (empty) as the working directory; what it printed and wrote."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
        crash = ""
    except BaseException as e:  # noqa: BLE001 - a crash (SystemExit included) is what we are looking for
        code, crash = -1, f"{type(e).__name__}: {e}"
    finally:
        os.chdir(cwd)
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    return Outcome(code, out.getvalue(), err.getvalue(), written, crash)


def accepted(case: Case) -> str:
    """'' if cli's parser accepts the value (required arguments filled in with placeholders), else its message."""
    parser = cli.build_parser()
    sub = dict(commands(parser))[case.command]
    argv = list(case.command)
    for action in value_options(sub):
        if action.required and action.dest != case.dest:
            argv += [action.option_strings[-1], "x"] if action.option_strings else ["x"]
    argv += case.argv[len(case.command):]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(argv)
    except SystemExit:
        return err.getvalue().strip() or "refused"
    return ""
