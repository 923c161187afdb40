#!/usr/bin/env python3
"""Phase 5 big run: `dinox train` (see docs/phase5_big_run.md)."""
import sys

from _shim import dinox_main

if __name__ == "__main__":
    sys.exit(dinox_main(["train", *sys.argv[1:]]))
