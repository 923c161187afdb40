"""Lets the seed scripts run from a checkout whether or not dinox is installed (its
dependencies must be: `make setup`, then run the scripts with .venv/bin/python)."""
from __future__ import annotations

import sys
from pathlib import Path


def dinox_main(argv: list[str]) -> int:
    try:
        try:
            from dinox.cli import main
        except ModuleNotFoundError as exc:
            if exc.name != "dinox":
                raise
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
            from dinox.cli import main
        return main(argv)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("dinox"):
            raise
        print(f"error: dinox needs the Python package {exc.name!r}, which {sys.executable} does not have; run "
              f"`make setup` and use .venv/bin/python (or pip install the project into this Python)",
              file=sys.stderr)
        return 1
