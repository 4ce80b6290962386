"""`conceptkit`: one command, sub-commands per job. Errors meant for the user print one line and exit with code 2.

This module only dispatches: each command's options and what it runs live in conceptkit/commands/<command>.py.
`python -m conceptkit ...` and `python -m conceptkit.cli ...` are the same as `conceptkit ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys

from .commands import compose, convert, demo, evaluate, generate, info, learn, report, shapes, ui
from . import locks
from .errors import UserError, one_line

COMMANDS = (generate, learn, compose, ui, demo, report, info, shapes, evaluate, convert)  # in `conceptkit --help` order


class Parser(argparse.ArgumentParser):
    """argparse, but a refused argument is one line (`error: --steps 0: pass an integer ...`), not the usage block
    and `prog: error:`; sub-command parsers are of this class too (add_subparsers passes its own class on)."""

    def error(self, message: str):
        from .commands.options import VALUE_MARK

        found = re.fullmatch(r"argument (\S+): (.*)", message, flags=re.S)
        if found and found[2].startswith(VALUE_MARK):  # our type checks: "--steps 0: pass ..."
            message = f"{found[1].split('/')[-1]} {found[2][len(VALUE_MARK):]}"
        elif found:  # argparse's own (invalid choice, expected one argument): "--format: invalid choice ..."
            message = f"{found[1].split('/')[-1]}: {found[2]}"
        self.exit(2, "error: " + message.replace("\r", "\\r").replace("\n", "\\n") + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="conceptkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def check_processes(args) -> None:
    """Under `accelerate launch`/`torchrun` with several processes only the commands that split their work run."""
    from .learn.distributed import launched_processes

    if launched_processes() > 1 and not getattr(args, "several_processes", False):
        raise UserError("this command runs in one process (learn ti, learn lora, generate, compose and evaluate base "
                        "run in several): launch it without accelerate/torchrun")


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM (the web UI's cancel, a batch system's stop) raises KeyboardInterrupt in the command, as Ctrl-C does,
    so a trainer writes a checkpoint of its last step before it stops (learn/loop.py); restored afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def written_folders(args) -> list[str]:
    """The folders the command writes (its `writes`: option names, or a function of the arguments), which it locks
    (locks.py) so that a second process given the same folder refuses instead of mixing two runs' files. Under a
    multi-process launch only the main process writes, so only it locks."""
    import os

    writes = getattr(args, "writes", ())
    if os.environ.get("RANK", "0") != "0":
        return []
    folders = writes(args) if callable(writes) else [getattr(args, name, None) for name in writes]
    return [f for f in folders if f]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a refused argument (2, its line already printed), or --help (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        check_processes(args)
        with locks.locked(*written_folders(args)), stop_on_sigterm():
            args.func(args)
    except UserError as e:  # one line, even when it quotes user input that holds line breaks
        print("error: " + one_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a write outside files.py's atomic writes (an appended log) refused by the disk
        from .files import write_failure

        if write_failure(e) is None:
            raise
        print(f"error: could not write {e.filename or 'a file'}: {write_failure(e)} (disk full, a size limit or a "
              "read-only folder?)", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        from .resources import is_out_of_memory, oom_advice

        if not is_out_of_memory(e):
            raise
        print(f"error: {oom_advice(args.command, e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
