"""`conceptkit`: one command, sub-commands per job. Errors meant for the user print one line and exit with code 2.

This module only dispatches: each command's options and what it runs live in conceptkit/commands/<command>.py.
`python -m conceptkit ...` and `python -m conceptkit.cli ...` are the same as `conceptkit ...`.
"""
from __future__ import annotations

import argparse
import sys

from .commands import compose, demo, evaluate, generate, info, learn, report, shapes, ui
from .errors import UserError, one_line

COMMANDS = (generate, learn, compose, ui, demo, report, info, shapes, evaluate)  # in `conceptkit --help` order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conceptkit", description=__doc__.splitlines()[0])
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_processes(args)
        args.func(args)
    except UserError as e:  # one line, even when it quotes user input that holds line breaks
        print("error: " + one_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        from .resources import is_out_of_memory, oom_advice

        if not is_out_of_memory(e):
            raise
        print(f"error: {oom_advice(args.command, e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
