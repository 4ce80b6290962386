"""Errors meant for the person running conceptkit (as opposed to bugs)."""


class UserError(Exception):
    """A one-line message for the user; the CLI prints it without a traceback and exits with code 2."""
