"""Check and summarise checkpoints: `python scripts/check_checkpoint.py data/runs/<RUN>/checkpoint_*.pth`.

A shim for `dinox inspect`; works from a checkout without installing the package."""
from __future__ import annotations

import sys
from pathlib import Path

try:
    from dinox.cli import main
except ModuleNotFoundError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from dinox.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
