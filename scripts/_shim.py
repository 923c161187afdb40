"""Lets the seed scripts run the dinox of their own checkout, whether or not a dinox is
installed (its dependencies must be: `make setup`, then run the scripts with
.venv/bin/python)."""
from __future__ import annotations

import sys
from pathlib import Path


def dinox_main(argv: list[str]) -> int:
    try:
        # The checkout's own package first: a script of this checkout running an older
        # dinox installed elsewhere would accept other flags and write other files.
        checkout_src = Path(__file__).resolve().parent.parent / "src"
        if (checkout_src / "dinox").is_dir():
            sys.path.insert(0, str(checkout_src))
        from dinox.cli import main
        return main(argv)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.startswith("dinox"):
            raise
        print(f"error: dinox needs the Python package {exc.name!r}, which {sys.executable} does not have; run "
              f"`make setup` and use .venv/bin/python (or pip install the project into this Python)",
              file=sys.stderr)
        return 1
