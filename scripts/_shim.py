"""Lets the seed scripts run from a checkout whether or not dinox is installed."""
from __future__ import annotations

import sys
from pathlib import Path


def dinox_main(argv: list[str]) -> int:
    try:
        from dinox.cli import main
    except ModuleNotFoundError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
        from dinox.cli import main
    return main(argv)
