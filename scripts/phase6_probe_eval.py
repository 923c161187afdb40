#!/usr/bin/env python3
"""Labelled validation of a checkpoint: `dinox eval probe` (exit 0 pass, 2 fail, 1 bad input)."""
import sys

from _shim import dinox_main

if __name__ == "__main__":
    sys.exit(dinox_main(["eval", "probe", *sys.argv[1:]]))
