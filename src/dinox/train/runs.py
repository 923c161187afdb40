"""The run folder a launch trains in: which checkpoint `--resume` continues, whether it
continues in place or branches into a new folder, claiming (locking) the folder, cleaning up
a start that failed, and the disk space a run needs.

`--resume auto`, and `--resume PATH` to the newest checkpoint of a run folder under
`--out`, continue that folder. Any other checkpoint (an older step, a backup copy) starts a
new folder under `--out` that records `resumed_from` and begins with the source's metrics
up to that step: continuing in place there would rotate away newer checkpoints, truncate
the metrics and overwrite the final checkpoint of the source run.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dinox.errors import UserError
from dinox.observe.anomaly import NONFINITE_CHANGES
from dinox.run.files import atomic_write_text

log = logging.getLogger("dinox.train")


# What dinox.train.state.unpack reads: a checkpoint lacking one of these cannot resume.
RESUME_KEYS = ("format", "format_version", "step", "student", "teacher", "gram_teacher", "dino_loss",
               "optimizer", "rng", "aug_generator", "data", "config")


@dataclass
class ResumeSource:
    """The checkpoint a launch continues, and where the continuation is written."""

    path: Path
    state: dict           # the full checkpoint (a dry run maps it); emptied once the trainer holds it
    step: int
    in_place: bool        # continue its run folder; else a new folder under --out
    snapshot: tuple = ()  # the run folder's checkpoints when chosen (in place only)


def find_checkpoint(resume: str, out_root: Path) -> tuple[Path | None, bool]:
    """The checkpoint to resume from, and whether its integrity was already verified
    (`--resume auto` checks every candidate; a given path is checked when loaded)."""
    from dinox.run.checkpoint import find_resume_checkpoint, latest_run_never_saved

    if resume == "auto":
        never_saved = latest_run_never_saved(out_root)
        if never_saved is not None:
            log.warning("--resume auto: the latest run under %s, %s, stopped before its first checkpoint; "
                        "starting a new run rather than continuing an older one (continue one with --resume PATH; "
                        "give each experiment its own --out)", out_root, never_saved.name)
            return None, True
        found = find_resume_checkpoint(out_root, RESUME_KEYS)
        if found is None:
            from dinox.run.checkpoint import list_checkpoints, list_run_dirs

            damaged = [p for run in list_run_dirs(out_root) for p in list_checkpoints(run)]
            if damaged:
                # a new run here would start over from step 0 beside the work these hold
                raise UserError(
                    f"--resume auto: all {len(damaged)} checkpoint(s) under {out_root} are damaged or unusable "
                    f"(the warnings above say why; e.g. {damaged[-1]}); restore one from a copy, resume from one "
                    f"you trust with --resume PATH, or start a new run with another --out (or without --resume)")
        return found, True
    from dinox.run.checkpoint import not_a_checkpoint

    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume {resume}: no such checkpoint; use --resume auto or a path to a .pth file "
                        f"(or a sharded checkpoint's .dcp folder)")
    problem = not_a_checkpoint(path)
    if problem:
        raise UserError(f"--resume {resume} {problem}")
    return path, False


def _checkpoint_snapshot(run_dir: Path) -> tuple:
    from dinox.run.checkpoint import list_checkpoints

    snapshot = []
    for path in list_checkpoints(run_dir):
        try:
            st = path.stat()
        except OSError:
            continue
        snapshot.append((path.name, st.st_size, st.st_mtime_ns))
    return tuple(snapshot)


def continues_in_place(path: Path, out_root: Path) -> bool:
    """Whether `--resume PATH` continues PATH's own run folder: only when that folder is a run
    folder directly under --out and PATH is its newest checkpoint. Otherwise continuing there
    would rotate away the newer checkpoints, truncate the metrics past PATH's step and
    overwrite the final checkpoint, or write a run into a backup folder."""
    from dinox.run.checkpoint import (
        is_run_dir_name,
        list_checkpoints,
        parse_checkpoint_name,
    )

    run = path.resolve().parent
    parsed = parse_checkpoint_name(path)
    if parsed is None or run.parent != out_root.resolve() or not is_run_dir_name(run.name):
        return False
    newest = max(parse_checkpoint_name(p)[0] for p in list_checkpoints(run))
    return parsed[0] >= newest


def open_resume(resume: str, out_root: Path, *, planning: bool) -> ResumeSource | None:
    """Find and load the checkpoint of `--resume` (None: `auto` found nothing). `planning`
    (a dry run) maps it instead of reading it: only its configuration is needed."""
    from dinox.config import check_checkpoint_format
    from dinox.run.checkpoint import load_checkpoint

    path, verified = find_checkpoint(resume, out_root)
    if path is None:
        return None
    # A sharded checkpoint's tensors are read later, straight into the live (sharded) modules.
    if planning:
        state = load_checkpoint(path, map_location="cpu", verify=False, mmap=True, tensors=False)
    else:
        state = load_checkpoint(path, map_location="cpu", verify=not verified, required=RESUME_KEYS,
                                tensors=False)
    check_checkpoint_format(state, path)
    if not isinstance(state.get("config"), dict):
        raise UserError(f"{path} carries no dinox configuration; resume from a checkpoint of dinox train")
    in_place = resume == "auto" or continues_in_place(path, out_root)
    return ResumeSource(path, state, int(state.get("step", 0)), in_place,
                        _checkpoint_snapshot(path.parent) if in_place else ())


def checkpoint_tensor_bytes(plan: dict) -> int:
    """Tensor bytes of one checkpoint of the planned model: student and EMA teacher
    (backbone + head), the Gram teacher (a backbone) and AdamW's two moments of the
    student, all fp32. RNG states, the centre and the configuration are small beside it."""
    backbone, head = int(plan["backbone_params"]), int(plan["head_params"])
    student = backbone + head
    return 4 * (student + student + backbone + 2 * student)


def _unwritable(target: Path) -> str | None:
    """Why nothing can be written where `target` (or its nearest existing parent) is, or
    None: told apart from a full disk by writing a temporary file there (a pseudo
    filesystem such as /proc reports 0 bytes free and refuses every write)."""
    import tempfile

    from dinox.run.checkpoint import nearest_existing

    where = nearest_existing(target)
    if not where.is_dir():
        return f"{where} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        return f"cannot write in {where} ({exc.strerror or exc})"
    return None


def check_disk_space(plan: dict, target: Path, keep_last: int, existing: int = 0) -> str | None:
    """Refuse a run whose first checkpoint cannot fit (found out at start-up, not hours in);
    a warning (returned) when the rotation's checkpoints will not all fit. `existing`:
    periodic checkpoints already in the folder (a run continued in place), whose space is
    taken already."""
    from dinox.run.checkpoint import disk_size_text, free_space, space_needed

    size = checkpoint_tensor_bytes(plan)
    need, free = space_needed(size), free_space(target)
    if free < need:
        unwritable = _unwritable(target)
        if unwritable:
            raise UserError(f"--out {target}: {unwritable}; give --out a folder you can write to")
        raise UserError(
            f"not enough disk space for one checkpoint: this model's checkpoint takes about "
            f"{disk_size_text(size)} (student, EMA teacher, Gram teacher and AdamW moments in fp32), a save asks "
            f"for {disk_size_text(need)} with its margin, and {disk_size_text(free)} are free at {target}; free "
            f"space there or give --out a folder on a disk with room")
    room = free // need
    # Rotation writes the new checkpoint before it deletes the oldest: keep_last + 1 at a time.
    if room < max(0, keep_last - existing) + 1:
        return (f"the disk at {target} has room for about {room} more checkpoints of {disk_size_text(size)}, "
                f"but --ckpt-keep-last {keep_last} keeps {keep_last} and a save needs one more: the run will stop "
                f"with a full disk; lower --ckpt-keep-last to {max(1, existing + room - 1)} or free space")
    return None


def resumed_from(source: ResumeSource) -> dict:
    """Where a branch started: the source run folder, checkpoint, step and the checkpoint's sha256."""
    from dinox.run.checkpoint import file_sha256

    path = source.path.resolve()
    return {"run": str(path.parent), "checkpoint": str(path), "step": source.step, "sha256": file_sha256(path)}


def prepare_run_dir(dist, out_root: Path, source: ResumeSource | None, resume_auto: bool = False):
    """(run folder, lock, created by this launch). Rank 0 decides and locks; every rank gets
    the folder, or the same one-line error. `resume_auto`: the launch asked to continue the
    run under out_root and found no checkpoint; it still must not start beside a live run
    that has none yet (a job launched twice, a requeue racing its predecessor)."""
    from dinox.run.distributed import broadcast_object

    run_dir = lock = error = None
    created = False
    if dist.is_main:
        try:
            if source is None and resume_auto:
                _refuse_beside_live_run(out_root)
            run_dir, lock, created = _claim_run_dir(out_root, source)
        except UserError as exc:
            error = exc
    outcome = broadcast_object((str(run_dir) if run_dir else None, str(error) if error else None))
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise UserError(outcome[1])
    return Path(outcome[0]), lock, created


def _refuse_beside_live_run(out_root: Path) -> None:
    from dinox.run.checkpoint import is_run_dir_name, run_dir_holder

    if not out_root.is_dir():
        return
    for run_dir in sorted(out_root.iterdir()):
        holder = run_dir_holder(run_dir) if run_dir.is_dir() and is_run_dir_name(run_dir.name) else None
        if holder is not None:
            raise UserError(f"--resume auto: {run_dir} is being trained by pid {holder.get('pid', '?')} on host "
                            f"{holder.get('host', '?')} (since {holder.get('since', '?')}) and has no checkpoint "
                            f"yet; a second launch would start a parallel run: wait for that one, stop it, or "
                            f"train into another --out")


def _claim_run_dir(out_root: Path, source: ResumeSource | None):
    from dinox.run.checkpoint import lock_run_dir, new_run_dir, set_aside_damaged_after

    if source is not None and source.in_place:
        run_dir = source.path.parent
        lock = lock_run_dir(run_dir)
        if _checkpoint_snapshot(run_dir) != source.snapshot:
            lock.release()
            raise UserError(f"run folder {run_dir} changed while this launch was starting (another process "
                            f"saved a checkpoint there); run the command again to continue from the newest one")
        set_aside_damaged_after(source.path)
        return run_dir, lock, False
    run_dir, lock = new_run_dir(out_root), None
    try:
        lock = lock_run_dir(run_dir)
        if source is not None:
            copy_metrics_until(source.path.parent, run_dir, source.step)
    except BaseException:
        remove_failed_start(run_dir, source)
        if lock is not None:
            lock.release()
        raise
    return run_dir, lock, True


def copy_metrics_until(source_run: Path, run_dir: Path, step: int) -> int:
    """Copy the source run's metrics.jsonl rows up to `step` into a branch's new folder, so
    the branch's record covers its whole history; returns the rows copied."""
    from dinox.observe.metrics import METRICS_FILE, lines_until

    src = source_run / METRICS_FILE
    if not src.is_file():
        return 0
    kept, _ = lines_until(src, step)
    if kept:
        atomic_write_text(run_dir / METRICS_FILE, "".join(kept))
    return len(kept)


# What may differ between the ranks of one run: what each node decides for itself (loader
# workers, pinning, its hardware preset), paths that may name the same files on each node's
# own mounts (the data are compared by content instead), and the console's cadence.
PER_NODE_KEYS = ("num_workers", "pin_memory", "hardware_preset", "custom_values", "data_root", "index_csv",
                 "split_manifest", "init_from", "out", "resume", "log_interval")


def check_ranks_agree(flat_config: dict, data_hash: str | None, source: ResumeSource | None) -> None:
    """Collective: refuse, on every rank, a run whose ranks were launched with different
    settings, data or checkpoint (a node given another command line, another data copy, or an
    --out that is not shared). Unnoticed, it trains silently on a wrong batch or hangs in a
    collective that the other ranks never reach."""
    from dinox.run.distributed import all_gather_object

    own = {k: v for k, v in flat_config.items() if k not in PER_NODE_KEYS}
    own["data (index and split files)"] = data_hash
    own["resumed checkpoint"] = f"{source.path.name} (step {source.step})" if source is not None else None
    everyone = all_gather_object(own)
    first = everyone[0]
    for rank, other in enumerate(everyone[1:], start=1):
        differ = [k for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k)]
        if differ:
            shown = "; ".join(f"{k} {first.get(k)!r} on rank 0, {other.get(k)!r} on rank {rank}" for k in differ[:3])
            more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
            raise UserError(f"the ranks of this run were launched differently: {shown}{more}; run the same command "
                            f"on every node, with the same data at --data-root and an --out that every node sees")


HALT_RECORD = "halted_nonfinite.json"


def record_nonfinite_halt(run_dir: Path, checkpoint: Path | None, step: int) -> None:
    """Note the step whose loss was non-finite (and the emergency checkpoint it left), for
    `refuse_replayed_halt`."""
    if checkpoint is None:
        return
    atomic_write_text(Path(run_dir) / HALT_RECORD, json.dumps({"checkpoint": Path(checkpoint).name, "step": step}) + "\n")


def refuse_replayed_halt(source: ResumeSource | None, changes: list[str]) -> None:
    """`--resume auto` from the state before a non-finite halt (its emergency checkpoint, or a
    periodic one of the same step), with no setting changed, replays the same data and RNG into the same NaN: a job script that requeues on
    failure would loop until its allocation ends. Refuse, saying what to change; `--resume
    PATH` retries as is (on a GPU the replay may differ)."""
    if source is None or changes:
        return
    try:
        record = json.loads((source.path.parent / HALT_RECORD).read_text())
    except (OSError, ValueError):
        return
    if source.step == record.get("step", 0) - 1:  # its emergency checkpoint, or a periodic one of that step
        raise UserError(f"--resume auto: {source.path} is the state before the non-finite step {record['step']} "
                        f"that halted this run, and no setting changed, so the same step would fail again; resume "
                        f"with a change ({NONFINITE_CHANGES}), or retry "
                        f"as is with --resume {source.path}")


def remove_failed_start(run_dir: Path, source: ResumeSource | None) -> None:
    """Delete a run folder made by this launch when the run never got going: no checkpoint
    and no metrics row of its own (a branch's copied rows do not count). Anything else in
    it, or a run that trained a while, is kept."""
    import shutil

    from dinox.observe.metrics import METRICS_FILE
    from dinox.run.checkpoint import LOCK_NAME, list_checkpoints, remove_made_folders

    if not run_dir.is_dir() or list_checkpoints(run_dir):
        return
    step = source.step if source is not None else 0
    metrics = run_dir / METRICS_FILE
    try:
        rows = metrics.read_text(encoding="utf-8", errors="replace").splitlines() if metrics.exists() else []
    except OSError:
        return
    for line in rows:
        try:
            if int(json.loads(line)["step"]) > step:
                return
        except (ValueError, KeyError, TypeError):
            continue
    expected = {"config.json", "train.log", METRICS_FILE, LOCK_NAME}
    for entry in run_dir.iterdir():
        if entry.name not in expected and not entry.name.startswith(("events.out.tfevents.", f".{LOCK_NAME}.")):
            return
    shutil.rmtree(run_dir, ignore_errors=True)
    remove_made_folders(run_dir)
    log.info("removed %s: the run stopped before its first step", run_dir)
