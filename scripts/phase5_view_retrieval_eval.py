#!/usr/bin/env python3
"""Label-free view retrieval of a checkpoint: `dinox eval retrieval` (exit 0 pass, 2 fail)."""
import sys

from _shim import dinox_main

if __name__ == "__main__":
    sys.exit(dinox_main(["eval", "retrieval", *sys.argv[1:]]))
