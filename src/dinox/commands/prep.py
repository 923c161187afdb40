"""`dinox prep`: the command-line front-end of dinox.data.ingest."""
from __future__ import annotations

import argparse
from pathlib import Path

from dinox.commands.argtypes import path, positive_int, seed_int
from dinox.data.ingest import NIFTI_PATIENT_CHOICES, format_summary, prepare
from dinox.data.parallel import DEFAULT_WORKERS
from dinox.run.signals import interrupts_raise


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prep", help="convert DICOM/NIfTI CT scans into the processed data root",
        description="Convert DICOM series and NIfTI volumes into int16 HU volumes, an index "
                    "and a patient-level train/val split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, type=path, metavar="DIR",
                   default=argparse.SUPPRESS,
                   help="folders (searched recursively) or files with DICOM and/or NIfTI scans")
    p.add_argument("--output", type=path, default=Path("data/processed"), help="processed data root")
    p.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS,
                   help="parallel processes")
    p.add_argument("--force", action="store_true",
                   help="rewrite series that are already done, reading every file again (no cached header)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of patients for validation")
    p.add_argument("--split-seed", type=seed_int, default=0, help="seed of the patient split")
    p.add_argument("--nifti-patient", choices=NIFTI_PATIENT_CHOICES, default="name",
                   help="a NIfTI file's patient id: its file name (one scan per patient, e.g. "
                        "LIDC-IDRI-0001.nii.gz) or its folder (<patient>/<scan>.nii.gz: a patient's "
                        "scans stay on one side of the split)")
    # the demo's own next step follows its prep, not the summary's advice to plan a run
    p.add_argument("--no-next-step", action="store_false", dest="next_step", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args) -> int:
    # SIGTERM too unwinds, so the volumes written are indexed; prepare says what it left where it can
    with interrupts_raise(lambda sig: f"prep stopped by {sig} before it finished; run the same command again "
                                      f"(series already in the index are not read again)"):
        report = prepare(args.input, args.output, workers=args.workers, force=args.force,
                         val_fraction=args.val_fraction, split_seed=args.split_seed,
                         nifti_patient=args.nifti_patient)
    print(format_summary(report, next_step=args.next_step))
    return 0
