"""Check and summarise checkpoints: `python scripts/check_checkpoint.py data/runs/<RUN>/checkpoint_*.pth`.

A shim for `dinox inspect`; works from a checkout without installing the package (its
dependencies installed: `make setup`)."""
from __future__ import annotations

import sys

from _shim import dinox_main

if __name__ == "__main__":
    sys.exit(dinox_main(["inspect", *sys.argv[1:]]))
