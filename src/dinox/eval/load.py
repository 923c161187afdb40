"""Load a trained backbone from a checkpoint for inference (eval, monitor, inspect, export),
and find the processed data its evaluations read."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from dinox.config import RunConfig, config_from_checkpoint
from dinox.data.layout import INDEX_FILE, default_manifest, root_of_index, same_path
from dinox.errors import UserError
from dinox.model.dino_model import build_dino_model
from dinox.run import checkpoint as store

NETWORKS = ("teacher", "student")


def load_for_inference(path: str | Path, device: torch.device, which: str = "teacher"):
    """(backbone in eval mode on `device`, RunConfig, SimpleNamespace(step, raw)) of the
    `which` network ("teacher" or "student") of a dinox checkpoint."""
    path = Path(path)
    if which not in NETWORKS:
        raise UserError(f"--network {which!r}: choose one of {', '.join(NETWORKS)}")
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; list a run's checkpoints with ls data/runs/*/")
    problem = store.not_a_checkpoint(path)
    if problem:
        raise UserError(f"checkpoint {path} {problem}")
    state = store.load_checkpoint(path, map_location="cpu")
    cfg = config_from_checkpoint(state, path)
    problem = (f"lacks the {which} network (incomplete)" if which not in state else None) or store.step_problem(state)
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}; use another checkpoint of the run")
    with torch.device("cpu"):
        model = build_dino_model(cfg.model, img_size=cfg.views.img_size, drop_path=0.0)
    store.load_network(model, state[which], path, which)
    backbone = model.backbone.to(device).eval()
    backbone.grad_checkpoint = False
    return backbone, cfg, SimpleNamespace(step=state["step"], raw=state)


def own_data_paths(cfg, provenance: dict | None = None) -> tuple[Path, Path | None, Path | None]:
    """(processed root, index CSV or None, split manifest or None) the run trained on:
    absolute as its provenance recorded them where it did, else as the config holds them;
    None where the run used its root's default."""
    files = (provenance or {}).get("data_files") if isinstance(provenance, dict) else None
    recorded = [Path(f) for f in files] if isinstance(files, list) and len(files) == 2 else []
    own_root = Path(cfg.io.data_root)
    own_index = Path(cfg.io.index_csv) if cfg.io.index_csv else None
    own_manifest = Path(cfg.io.split_manifest) if cfg.io.split_manifest else None
    if recorded:
        if own_index is None and recorded[0].parent.name == Path(INDEX_FILE).parent.name:
            own_root = recorded[0].parent.parent
        own_index = recorded[0] if own_index is not None else None
        own_manifest = recorded[1] if own_manifest is not None else None
    return own_root, own_index, own_manifest


def run_data_paths(cfg, data_root=None, index_csv=None, split_manifest=None,
                   provenance: dict | None = None) -> tuple[Path, Path | None, Path | None]:
    """(processed root, index CSV or None, split manifest or None) that an evaluation of a
    run's checkpoint reads: what was given, and the run's own for what was not, so that an
    evaluation without data flags scores the run's own validation patients. Given only an
    index CSV, the root is the folder above its _index/. The run's index and manifest apply
    only on the run's own root (elsewhere None: the root's defaults).

    The run's own paths are the absolute ones its `provenance` recorded at the start (the
    config keeps them as typed, perhaps relative to a folder the evaluation is not run
    from, where a path of the same name may hold other data). A manifest the run named
    that is gone is an error, not a fall-back to the root's default split, which may put
    the run's training patients on the validation side."""
    own_root, own_index, own_manifest = own_data_paths(cfg, provenance)
    if data_root is not None:
        root = Path(data_root)
    elif index_csv is not None:
        root = root_of_index(index_csv)
    else:
        root = own_root
    on_own_root = same_path(root, own_root)
    index = Path(index_csv) if index_csv else None
    if index is None and on_own_root:
        index = own_index
    manifest = Path(split_manifest) if split_manifest else None
    if manifest is None and on_own_root and own_manifest is not None:
        if not own_manifest.is_file():
            raise UserError(f"the run's split manifest {own_manifest} is gone; give --split-manifest (the "
                            f"root's default split may hold the run's training patients on its val side)")
        manifest = own_manifest
    if not root.is_dir() and index is None:
        if data_root is None and index_csv is None:
            where = "" if root.is_absolute() else ", relative to the folder the run was started in"
            raise UserError(f"the run's data root {root} not found here{where}; give --data-root (the folder "
                            f"`dinox prep` wrote)")
        raise UserError(f"processed root {root} not found; give --data-root (the folder `dinox prep` wrote)")
    return root, index, manifest


def changed_split_warning(provenance: dict | None, root, manifest) -> str | None:
    """A one-line warning where an evaluation reads the split manifest its run trained with
    and that file has changed since (edited by hand, or redrawn by a prep older than
    `extend_split`, which could move a patient at the boundary): the val side may then hold
    patients the run trained on. None where it is unchanged, another file, or the
    checkpoint predates per-file hashes."""
    from dinox.run.provenance import data_manifest_hash

    if not isinstance(provenance, dict):
        return None
    files, hashes = provenance.get("data_files"), provenance.get("data_file_hashes")
    if not (isinstance(files, list) and isinstance(hashes, list) and len(files) == len(hashes) == 2):
        return None
    read = Path(manifest) if manifest is not None else default_manifest(root)
    if not read.is_file() or not same_path(read, files[1]) or data_manifest_hash([read]) == hashes[1]:
        return None
    return (f"the split manifest {read} has changed since this run trained with it (edited, or redrawn by an "
            f"older prep?): its val side may now hold patients the run trained on; give --split-manifest a copy "
            f"of the run's split")


def warn_if_split_changed(provenance: dict | None, root, manifest) -> None:
    """Print `changed_split_warning`'s warning, if any (eval retrieval, eval probe, monitor)."""
    warning = changed_split_warning(provenance, root, manifest)
    if warning:
        print(f"warning: {warning}", flush=True)


@dataclass
class Evaluation:
    """What an evaluation of a checkpoint works with: the device, the frozen backbone and
    its run's config, and the data it reads beside the data the run trained on."""
    device: torch.device
    backbone: torch.nn.Module
    cfg: RunConfig
    step: int
    root: Path
    index_csv: Path | None
    manifest: Path | None
    trained_root: Path
    trained_manifest: Path | None


def open_evaluation(checkpoint, *, device: str = "auto", network: str = "teacher", data_root=None,
                    index_csv=None, split_manifest=None) -> Evaluation:
    """Load `network` of `checkpoint` onto the `device` asked for (its notes printed as
    warnings) and find the data an evaluation reads (`run_data_paths`), warning where the
    run's split manifest has changed since it trained (eval retrieval, eval probe, monitor)."""
    from dinox.run.device import detect_device

    info, notes = detect_device(device)
    for note in notes:
        print(f"warning: {note}")
    torch_device = torch.device(info.torch_device)
    backbone, cfg, meta = load_for_inference(checkpoint, torch_device, which=network)
    provenance = meta.raw.get("provenance")
    root, index, manifest = run_data_paths(cfg, data_root, index_csv, split_manifest, provenance)
    trained_root, _, trained_manifest = own_data_paths(cfg, provenance)
    warn_if_split_changed(provenance, root, manifest)
    return Evaluation(torch_device, backbone, cfg, meta.step, root, index, manifest, trained_root, trained_manifest)
