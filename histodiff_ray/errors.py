"""Errors a user can act on. The CLI prints their message on one line and exits non-zero."""


class HistodiffError(Exception):
    """A problem with the user's input, config or environment; the message names it and the fix."""
