"""Errors meant for the person running conceptkit (as opposed to bugs)."""


class UserError(Exception):
    """A one-line message for the user; the CLI prints it without a traceback and exits with code 2."""


def one_line(error: BaseException) -> str:
    """The error's message on one line, even when it quotes user input that holds line breaks."""
    return str(error).replace("\r", "\\r").replace("\n", "\\n")
