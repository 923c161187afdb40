#!/usr/bin/env python3
"""Heatmaps and embedding statistics of a checkpoint: `dinox monitor`."""
import sys

from _shim import dinox_main

if __name__ == "__main__":
    sys.exit(dinox_main(["monitor", *sys.argv[1:]]))
