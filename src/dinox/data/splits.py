"""Patient-level train/validation split."""
from __future__ import annotations

import hashlib


def _rank(seed: int, patient_id: str) -> str:
    return hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()


def patient_split(series_patient: dict[str, str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """{"train": [...], "val": [...]} series ids; all series of a patient land on one side.

    Patients are ordered by a hash of (seed, patient id) and the first round(f * n) go to
    validation (at least one, and at least one left for training, when f > 0 and there are
    two or more patients). The assignment of a patient does not depend on the order of the
    input, and adding patients moves few others."""
    patients = sorted(set(series_patient.values()), key=lambda p: (_rank(seed, p), p))
    n_val = round(val_fraction * len(patients))
    if val_fraction > 0 and len(patients) >= 2:
        n_val = min(max(n_val, 1), len(patients) - 1)
    val_patients = set(patients[:n_val])
    split = {"train": [], "val": []}
    for sid in sorted(series_patient):
        split["val" if series_patient[sid] in val_patients else "train"].append(sid)
    return split


def split_overlap(split: dict) -> list[str]:
    """Series ids listed in both "train" and "val" of a split manifest, sorted (validation
    on them would score what the model trained on)."""
    train, val = split.get("train"), split.get("val")
    if not isinstance(train, list) or not isinstance(val, list):
        return []
    return sorted({str(s) for s in train} & {str(s) for s in val})


def patient_overlap(split: dict, patient_of: dict[str, str]) -> list[str]:
    """Patients with series on both sides of a split manifest, sorted; series not in
    `patient_of` or with an empty patient id are not counted."""
    train, val = split.get("train"), split.get("val")
    if not isinstance(train, list) or not isinstance(val, list):
        return []

    def patients(ids):
        return {patient_of.get(str(s)) or None for s in ids} - {None}

    return sorted(patients(train) & patients(val))
