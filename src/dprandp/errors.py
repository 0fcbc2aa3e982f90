"""User-facing errors.

Library code raises :class:`InputError` for anything a user can fix (a bad flag, a missing
file, an impossible privacy budget). The CLI turns it into one line on stderr and exit status 2;
library users catch it like any ``ValueError``.
"""

from __future__ import annotations


class InputError(ValueError):
    """Invalid input from the user: the message names the problem in one line."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`InputError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InputError(message)
