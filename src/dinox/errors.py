"""Errors a user can cause: the CLI prints their one-line message and exits non-zero."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or an impossible request; the message says what to do about it."""

    exit_code = 1
