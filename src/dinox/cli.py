"""The one `dinox` command; each subcommand lives in its own module."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("dinox: under construction", file=sys.stderr)
    return 0
