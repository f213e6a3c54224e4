"""Exceptions a user can act on. The CLI prints their message and exits with their `exit_code`."""


class LLMEraserError(Exception):
    """Base class: a problem with the user's input or with the numerics, and its fix."""

    exit_code = 2


class InputError(LLMEraserError):
    """Bad input: a file, a record, a request line or a flag. The message names it and the fix."""


class NumericalError(LLMEraserError):
    """A non-finite HVP, residual, gradient or result; nothing is written when this is raised."""


class NotConvergedError(LLMEraserError):
    """The solve stopped above its tolerance; nothing is written unless the caller accepts that."""

    exit_code = 3


# `unlearn --verify until` wrote the adapter, but its checks did not pass within the budget (verify.py)
NOT_VERIFIED_EXIT = 4
