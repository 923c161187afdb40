"""Patient-level train/validation split: making one (`patient_split`) and reading one that
`dinox prep` or a user wrote (`read_split_manifest`), checked as a whole."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from dinox.data.layout import REPORT_FILE, SPLITS_DIR
from dinox.errors import UserError


def _rank(seed: int, patient_id: str) -> str:
    return hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()


def _val_count(n_patients: int, val_fraction: float) -> int:
    """round(f * n) patients for validation; at least one, and at least one left for
    training, when f > 0 and there are two or more patients."""
    n_val = round(val_fraction * n_patients)
    if val_fraction > 0 and n_patients >= 2:
        n_val = min(max(n_val, 1), n_patients - 1)
    return n_val


def same_scan_patients(series_patient: dict[str, str], same_scans) -> dict[str, str]:
    """`series_patient` with every copy of one scan (a group of prep's `same_scans`, its
    first copy first) taking its first copy's patient id, so that a split by patient keeps
    the copies on one side: each copy took a patient id from its own source (a NIfTI that
    dcm2niix wrote beside its DICOM series, a series copied under new UIDs), and validation
    on one copy would score the other's training."""
    merged = dict(series_patient)
    for group in same_scans or ():
        present = [str(sid) for sid in group if str(sid) in merged] if isinstance(group, list) else []
        merged.update((sid, merged[present[0]]) for sid in present[1:])   # an index may lack the first copy
    return merged


def split_patients(root, rows) -> dict[str, str]:
    """series id -> the patient an indexed series splits as (index rows of `root`): its
    patient_id, the copies of one scan (the prep report's same_scans) as one patient."""
    return same_scan_patients({r["series_id"]: r.get("patient_id", "") for r in rows}, read_same_scans(root))


def read_same_scans(root) -> list[list[str]]:
    """The `same_scans` groups of the prep report under `root` (empty where there is no
    readable report: a root prepared by hand, or by a dinox before the check)."""
    try:
        groups = json.loads((Path(root) / REPORT_FILE).read_text(encoding="utf-8")).get("same_scans")
    except (OSError, ValueError, AttributeError):
        return []
    return [[str(s) for s in g] for g in groups if isinstance(g, list)] if isinstance(groups, list) else []


def patient_split(series_patient: dict[str, str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """{"train": [...], "val": [...]} series ids; all series of a patient land on one side.

    Patients are ordered by a hash of (seed, patient id) and the first round(f * n) go to
    validation (at least one, and at least one left for training, when f > 0 and there are
    two or more patients). The assignment of a patient does not depend on the order of the
    input, and adding patients moves few others."""
    patients = sorted(set(series_patient.values()), key=lambda p: (_rank(seed, p), p))
    val_patients = set(patients[:_val_count(len(patients), val_fraction)])
    split = {"train": [], "val": []}
    for sid in sorted(series_patient):
        split["val" if series_patient[sid] in val_patients else "train"].append(sid)
    return split


def extend_split(previous: dict | None, series_patient: dict[str, str], val_fraction: float,
                 seed: int) -> dict[str, list[str]]:
    """The split of `series_patient` that keeps every patient of `previous` (the split an
    earlier prep wrote under the same name) on its side, so that a run trained on it never
    finds its training patients on the val side of a later evaluation. Patients new to the
    index fill the val side up to `val_fraction` of all patients, in `patient_split`'s hash
    order (at least one patient on each side where there are two or more); series no longer
    indexed leave. Without a usable `previous` it is `patient_split`."""
    side_of: dict[str, str] = {}
    if isinstance(previous, dict):
        for side in ("train", "val"):
            listed = previous.get(side)
            for sid in listed if isinstance(listed, list) else []:
                patient = series_patient.get(str(sid))
                if patient is not None:
                    side_of.setdefault(patient, side)  # a patient listed on both sides trains
    if not side_of:
        return patient_split(series_patient, val_fraction, seed)
    patients = set(series_patient.values())
    new = sorted(patients - side_of.keys(), key=lambda p: (_rank(seed, p), p))
    take = max(0, _val_count(len(patients), val_fraction) - sum(side == "val" for side in side_of.values()))
    if "train" not in side_of.values():
        take = min(take, len(new) - 1)
    side_of.update({p: "val" if k < take else "train" for k, p in enumerate(new)})
    split = {"train": [], "val": []}
    for sid in sorted(series_patient):
        split[side_of[series_patient[sid]]].append(sid)
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


def _manifest_files(folder: Path) -> list[Path]:
    """Split manifests in `folder` or its _splits/ (never the prep report)."""
    if not folder.is_dir():
        return []
    return (sorted(folder.glob(f"{SPLITS_DIR}/*.json"))
            or sorted(p for p in folder.glob("*.json") if p.name != REPORT_FILE))


def read_split_manifest(manifest, patient_of: dict[str, str], index_csv=None,
                        need: str | None = None) -> dict[str, list[str]]:
    """The sides ("train", "val") of the split manifest at `manifest`, checked as a whole
    against the index's series (`patient_of`: series id -> patient id; `index_csv` names the
    index in messages): each side present is a list of series ids of the index without
    repeats, and no series or patient is on both sides (validation on them would score
    training data). `need` names a side that must be present. Raises UserError saying what
    is wrong and what to do."""
    manifest = Path(manifest)
    if manifest.is_dir():
        inside = _manifest_files(manifest)
        raise UserError(f"split manifest {manifest} is a folder; give a split JSON file"
                        + (f", e.g. {inside[0]}" if inside else f" (`dinox prep` writes them under "
                                                                  f"<root>/{SPLITS_DIR}/)"))
    if not manifest.is_file():
        others = _manifest_files(manifest.parent)
        if others:
            raise UserError(f"split manifest not found: {manifest}; the folder has {', '.join(p.name for p in others)}: "
                            f"pass --split-manifest {others[0]} (or re-run `dinox prep` with the --val-fraction "
                            f"and --split-seed wanted)")
        raise UserError(f"split manifest not found: {manifest}; run `dinox prep` first")
    fix = "fix it, or re-run `dinox prep` to write the split again"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8-sig"))   # -sig: a BOM from a Windows editor
    except UnicodeDecodeError:
        raise UserError(f"split manifest {manifest} is not UTF-8 text; save it as UTF-8 JSON, or {fix}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"split manifest {manifest} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                        f"{exc.colno}); {fix}") from None
    except OSError as exc:
        raise UserError(f"cannot read split manifest {manifest} ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"split manifest {manifest} holds a JSON {type(data).__name__}, not an object with "
                        f'"train" and "val" lists of series ids; {fix}')
    if need is not None and need not in data:
        raise UserError(f'split manifest {manifest} has no "{need}" list (keys: {", ".join(map(str, data)) or "none"}); '
                        f"{fix}")
    sides = {}
    for side in ("train", "val"):
        if side not in data:
            continue
        ids = data[side]
        if not isinstance(ids, list) or not all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in ids):
            what = type(ids).__name__ if not isinstance(ids, list) else "list with entries that are not ids"
            raise UserError(f"split manifest {manifest}: {side!r} must be a list of series ids, not a {what}; {fix}")
        ids = [str(s) for s in ids]
        repeated = sorted(s for s, n in Counter(ids).items() if n > 1)
        if repeated:
            raise UserError(f"split manifest {manifest} lists series {repeated[0]} more than once in {side!r} "
                            f"({len(repeated)} repeated); list each series once")
        unknown = [s for s in ids if s not in patient_of]
        if unknown:
            raise UserError(f"{len(unknown)} series of {manifest} ({side}) are not in the index"
                            f"{f' {index_csv}' if index_csv else ''} (e.g. {unknown[0]}); re-run `dinox prep` so "
                            f"both match, or give the manifest of this root")
        sides[side] = ids
    both = split_overlap(sides)
    if both:
        raise UserError(f"{manifest} lists {len(both)} series in both train and val (e.g. {both[0]}): "
                        f"validation would score training data; re-run `dinox prep` to rewrite the split "
                        f"or remove them from one side")
    shared = patient_overlap(sides, patient_of)
    if shared:
        train_sid, val_sid = (next(s for s in sides[side] if patient_of.get(s) == shared[0])
                              for side in ("train", "val"))
        raise UserError(f"{manifest} puts {len(shared)} patient(s) on both train and val (e.g. series {train_sid} "
                        f"in train and {val_sid} in val are patient {shared[0]} by the index's patient_id, or "
                        f"copies of one scan by prep_report.json's same_scans): validation would score a "
                        f"patient the model trained on; list each patient's series on one side, or use the "
                        f"split `dinox prep` writes")
    return sides
