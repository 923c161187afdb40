"""`dinox synth`: the command-line front-end of dinox.data.synth."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from dinox.commands.argtypes import int_at_least, path, positive_int, seed_int
from dinox.data.parallel import DEFAULT_WORKERS
from dinox.data.synth import FAMILIES, generate_dataset
from dinox.run.signals import interrupts_raise

FINDINGS_NAME = {"chest": "nodules", "head": "haemorrhages", "limb": "findings"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="write synthetic CT DICOM series (procedural chest, head or limb phantoms)",
        description="Write procedural CT phantoms as DICOM series plus labels.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=path, default=argparse.SUPPRESS, help="output folder")
    p.add_argument("--family", choices=list(FAMILIES), default="chest",
                   help="phantom family: chest (lungs, nodules), head (brain, skull; haemorrhages) or "
                        "limb (thigh, leg or forearm; bone lesions, soft-tissue masses, implants)")
    p.add_argument("--patients", type=positive_int, default=4, help="number of patients (one series each)")
    p.add_argument("--slices", type=int_at_least(3), default=64, help="slices per series")
    p.add_argument("--size", type=positive_int, default=256, help="rows and columns per slice")
    p.add_argument("--slice-thickness", type=float, metavar="MM", default=argparse.SUPPRESS,
                   help="slice spacing in mm, e.g. 1.25 for thin-slice chest CT like LIDC-IDRI's (default: the "
                        "slices spread over the anatomy, 0.625-5 mm)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed; same seed, same files")
    p.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS,
                   help="parallel processes (the files do not depend on it)")
    p.set_defaults(func=run)


def run(args) -> int:
    family = getattr(args, "family", "chest")
    start = time.perf_counter()
    # SIGTERM too stops the worker processes and says so
    with interrupts_raise(lambda sig: f"synth stopped by {sig} before it finished writing {args.out}; run the "
                                      f"same command again to complete it"):
        labels = generate_dataset(args.out, args.patients, args.slices, args.size, args.seed, progress=True,
                                  family=family, workers=getattr(args, "workers", 1),
                                  slice_thickness=getattr(args, "slice_thickness", None))
    elapsed = time.perf_counter() - start
    kinds = {k: 0 for k in FAMILIES[family].finding_types}
    for s in labels["series"]:
        for n in s["nodules"]:
            kinds[n["type"]] += 1
    counts = ", ".join(f"{v} {k.replace('_', '-')}" for k, v in kinds.items())
    print(f"synth: {args.patients} series of {args.slices} x {args.size} x {args.size} ({family}) written to "
          f"{args.out} in {elapsed:.1f} s")
    spacings = sorted({s["spacing_zyx_mm"][0] for s in labels["series"]})
    print(f"  slice spacing: {spacings[0]:g} mm" if len(spacings) == 1 else
          f"  slice spacing: {spacings[0]:g}-{spacings[-1]:g} mm")
    print(f"  {FINDINGS_NAME[family]}: {sum(kinds.values())} ({counts}); labels: {Path(args.out) / 'labels.json'}")
    return 0
