"""Errors a user can act on.

Every error raised for bad input (a recipe field, a split-file line, a missing class) is a
``FillupError``: the CLI prints its message and exits with status 2, never a traceback.
"""


class FillupError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class RecipeError(FillupError):
    """A recipe that does not validate; the message names the field path."""


class SourceError(FillupError):
    """A source that cannot be indexed; the message names the file and line, or the class."""
