"""Exceptions a user can act on. The CLI prints their message and exits non-zero."""


class LLMEraserError(Exception):
    """Base class: a problem with the user's input or with the numerics, and its fix."""


class InputError(LLMEraserError):
    """Bad input: a file, a record, a request line or a flag. The message names it and the fix."""


class NumericalError(LLMEraserError):
    """A non-finite HVP, residual or gradient; nothing is written when this is raised."""
