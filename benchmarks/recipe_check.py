#!/usr/bin/env python3
"""Check a recipe on a synthetic family it was (or was not) tuned on: synth -> prep -> train
-> label-free retrieval of the untrained (step 0) and the final model, as JSON lines.

    python benchmarks/recipe_check.py --family chest --seeds 0 1 2 --tag default
    python benchmarks/recipe_check.py --family head --seeds 0 --tag no-ibot -- --ibot-weight 0
    python benchmarks/recipe_check.py --family head --seeds 2 --tag no-ibot --rescore --no-probe

Everything after `--` is passed to `dinox train` (it overrides the recipe). The data and
budget default to the demo's (160 patients x 12 slices x 96 px, its steps (DEMO_STEPS), batch 32,
n = 512 requested); results are appended to benchmarks/results/recipe_check.jsonl.

A single retrieval draw is noisy: at ~3 % top-1 of 480, two draws of views of the same
checkpoint differ by up to 12 hits (the 4096-prototype run scored 20, 8, 10 and 13 on four
draws). So besides the training-time eval (`ratio0`, `ratio`), the final and the untrained
network are scored on `--draws` view draws (seeds 1234, 1235, ...), and `hits_mean`,
`hits0_mean`, `x_untrained_mean` (with `x_untrained_ci95`, a bootstrap over the paired draws)
and the mean rank of the right key are recorded: compare recipes on those.

Where the family has nodule labels (chest), the final teacher is also probed for nodules
(`dinox eval probe` on every slice, `probe_slice_nodule` / `probe_patch_nodule` with the
untrained network, the pixels, the hand features and the paired intervals), so that a
recipe is judged on what its features find as well as on the retrieval; `--no-probe` skips it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from dinox.cli import main as dinox
from dinox.commands.demo import DEMO_BATCH, DEMO_EVAL_N, DEMO_PATIENTS, DEMO_SIZE, DEMO_SLICES, DEMO_STEPS

RESULTS = Path(__file__).resolve().parent / "results" / "recipe_check.jsonl"
PROBE_SLICES = 4096      # every slice of the default 160 x 12 data
PROBE_BOOTSTRAP = 200


def family_root(base: Path, family: str, seed: int, patients: int, slices: int, size: int,
                thickness: float | None = None) -> Path:
    """Where one family-seed's data and runs live."""
    return base / (f"{family}_s{seed}_{patients}x{slices}x{size}" + (f"_{thickness:g}mm" if thickness else ""))


def data_root(base: Path, family: str, seed: int, patients: int, slices: int, size: int,
              thickness: float | None = None) -> Path:
    """Synthesise and prepare once per (family, seed, size, slice thickness); reused by later checks."""
    root = family_root(base, family, seed, patients, slices, size, thickness)
    if not (root / "processed" / "_index" / "index.csv").exists():
        family_flag = ([] if family == "chest" else ["--family", family]) + (
            ["--slice-thickness", str(thickness)] if thickness else [])
        assert dinox(["synth", "--out", str(root / "dicom"), "--patients", str(patients), "--slices", str(slices),
                      "--size", str(size), "--seed", str(seed), *family_flag]) == 0
        assert dinox(["prep", "--input", str(root / "dicom"), "--output", str(root / "processed"),
                      "--val-fraction", "0.25"]) == 0
    return root


def read_eval(run: Path) -> dict[int, dict]:
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "Eval/Retrieval_Ratio" in row:
            rows[row["step"]] = row
    return rows


def last_train_row(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss_dino" in r][-1]


def final_teacher(run: Path, device_name: str):
    """The run's final checkpoint, its teacher backbone and its config, on the device."""
    import torch

    from dinox.eval.load import load_for_inference

    device = torch.device(device_name)
    checkpoint = sorted(run.glob("checkpoint_final_*.pth"))[-1]
    final, cfg, _ = load_for_inference(checkpoint, device)
    return checkpoint, final, cfg, device


def draws(checkpoint: Path, final, cfg, device, n: int, count: int) -> dict:
    """Retrieval of the final teacher, the final student and the untrained network, each the
    mean of `count` view draws (the teacher is the measure; the student shows how far the EMA
    teacher lags behind it)."""
    from dinox.data.dataset import CTSliceDataset
    from dinox.data.layout import INDEX_FILE
    from dinox.eval.load import load_for_inference
    from dinox.eval.probe import untrained_backbone
    from dinox.eval.runner import against_untrained, draw_ratios, evaluate_draws

    student, _, _ = load_for_inference(checkpoint, device, which="student")
    root = Path(cfg.io.data_root)
    dataset = CTSliceDataset(root, "val", cfg.io.split_manifest, root / INDEX_FILE,
                             context_mm=cfg.views.context_mm)
    out, scored = {}, {}
    for suffix, net in (("", final), ("_student", student),
                        ("0", untrained_backbone(cfg, device))):   # "0": the step-0 network
        scored[suffix] = evaluate_draws(net, dataset, cfg.views.to_augment(), draws=count, seed=1234, n=n,
                                        device=device)
        out[f"hits{suffix}_draws"] = draw_ratios(scored[suffix])
        out[f"hits{suffix}_mean"] = scored[suffix]["ratio"]
        out[f"mean_rank{suffix}"] = scored[suffix]["mean_rank"]
    versus = against_untrained(scored[""], scored["0"])   # paired: both networks saw the same views
    out["x_untrained_mean"], out["x_untrained_ci95"] = versus["x_untrained"], versus["x_untrained_ci95"]
    return out


def probes(final, cfg, device) -> dict:
    """The labelled nodule probes (`dinox eval probe`) of the final teacher on every slice of
    the family's data (more slices than the demo's 384: the intervals are ~half as wide),
    with their baselines; `probe_skipped` where the family has no nodule labels."""
    from dinox.errors import UserError
    from dinox.eval.probe import probe_backbone

    root = Path(cfg.io.data_root)
    try:
        result = probe_backbone(final, cfg, root, split_manifest=cfg.io.split_manifest, device=device,
                                max_slices=PROBE_SLICES, n_boot=PROBE_BOOTSTRAP)
    except UserError as exc:
        return {"probe_skipped": str(exc)}
    out = {"probe_min_lung_fraction": result["probe"]["min_lung_fraction"]}
    for name in ("slice_nodule", "patch_nodule"):
        task = result["tasks"].get(name)
        if task is None:
            out[f"probe_{name}"] = None
            continue
        out[f"probe_{name}"] = {
            "auroc": task["auroc"], "ci95": task["ci95"], "n_test": task["n_test"],
            **{base: {"auroc": v["auroc"], "delta_ci95": v["delta_ci95"]} for base, v in task["baselines"].items()},
            **{ref: v["auroc"] for ref, v in task.get("references", {}).items()},
        }
    return out


def check(args, seed: int, train_flags: list[str]) -> dict:
    root = data_root(Path(args.work), args.family, seed, args.patients, args.slices, args.size, args.slice_thickness)
    processed = root / "processed"
    runs = root / "runs" / args.tag
    start = time.perf_counter()
    code = dinox(["train", "--config", args.config, "--device", args.device, "--max-steps", str(args.steps),
                  "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
                  "--data-root", str(processed),
                  "--split-manifest", str(processed / "_splits" / "val25_seed0.json"), "--out", str(runs),
                  "--ckpt-every", str(args.steps), "--monitor-every", "0", "--eval-every", str(args.steps),
                  "--eval-n", str(args.eval_n), "--log-interval", "60", "--seed", str(seed), *train_flags])
    run = sorted(p for p in runs.iterdir() if p.is_dir())[-1]
    evals = read_eval(run)
    last = last_train_row(run)
    config = json.loads((run / "config.json").read_text())["train"]
    first, final = evals.get(0, {}), evals.get(args.steps, {})
    ratio0, ratio = first.get("Eval/Retrieval_Ratio"), final.get("Eval/Retrieval_Ratio")
    seconds = round(time.perf_counter() - start)   # training and its evals, not the scoring below
    scored = {}
    if code == 0 and (args.draws or args.probe):
        checkpoint, teacher, cfg, device = final_teacher(run, args.device)
        if args.draws:
            scored.update(draws(checkpoint, teacher, cfg, device, args.eval_n, args.draws))
        if args.probe:
            scored.update(probes(teacher, cfg, device))
    return {
        "tag": args.tag, "family": args.family, "seed": seed, "config": args.config, "steps": args.steps,
        "device": args.device, "flags": train_flags, "exit": code, "seconds": seconds,
        "data": {"patients": args.patients, "slices": args.slices, "size": args.size,
                 "slice_thickness": args.slice_thickness},
        "n": final.get("Eval/N"), "ratio0": ratio0, "ratio": ratio,
        "x_untrained": (ratio / ratio0) if ratio0 and ratio is not None else None,
        "top1": final.get("Eval/Retrieval_Top1"), "top5": final.get("Eval/Retrieval_Top5"),
        "erank0": first.get("Eval/Effective_Rank"), "erank": final.get("Eval/Effective_Rank"),
        "loss_dino": last.get("loss_dino"), "wall": math.log(config["out_dim"]),
        "below_wall": math.log(config["out_dim"]) - last.get("loss_dino", math.nan),
        "entropy_teacher": last.get("Entropy_Teacher"), "run": str(run),
        **scored,
    }


def rescore(args, seed: int) -> dict:
    """Score the final checkpoint of an earlier check of `--tag` again (`--draws`, the probes
    unless `--no-probe`), without training: to re-read old runs on more view draws."""
    runs = family_root(Path(args.work), args.family, seed, args.patients, args.slices, args.size,
                       args.slice_thickness) / "runs" / args.tag
    done = sorted(p for p in runs.glob("*") if p.is_dir() and any(p.glob("checkpoint_final_*.pth")))
    if not done:
        raise SystemExit(f"recipe_check: no finished run of tag {args.tag!r} under {runs}: "
                         "run the check first (without --rescore)")
    checkpoint, teacher, cfg, device = final_teacher(done[-1], args.device)
    out = {"tag": args.tag, "rescored": True, "family": args.family, "seed": seed, "config": args.config,
           "draws": args.draws, "run": str(done[-1])}
    if args.draws:
        out.update(draws(checkpoint, teacher, cfg, device, args.eval_n, args.draws))
    if args.probe:
        out.update(probes(teacher, cfg, device))
    return out


def main() -> int:
    argv = sys.argv[1:]
    train_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="chest")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tag", default="default")
    p.add_argument("--config", default="vit-tiny")
    p.add_argument("--steps", type=int, default=DEMO_STEPS)
    p.add_argument("--batch-size", type=int, default=DEMO_BATCH)
    p.add_argument("--eval-n", type=int, default=DEMO_EVAL_N)
    p.add_argument("--patients", type=int, default=DEMO_PATIENTS)
    p.add_argument("--slices", type=int, default=DEMO_SLICES)
    p.add_argument("--size", type=int, default=DEMO_SIZE)
    p.add_argument("--slice-thickness", type=float, default=None,
                   help="the phantoms' slice spacing in mm (`dinox synth --slice-thickness`; default: theirs)")
    p.add_argument("--work", default="data/recipe_check")
    p.add_argument("--device", default="cpu", help="where to train and score (cpu, cuda)")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--results", type=Path, default=RESULTS, help="the JSON-lines file results are appended to")
    p.add_argument("--draws", type=int, default=16, help="view draws to score the final and untrained network on "
                   "(0: only the training-time eval); 16 because the untrained network's ~4-12 hits of 480 make "
                   "x_untrained noisy on fewer (docs/recipes.md, \"How many view draws\")")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="the labelled nodule probes of the final teacher on every slice (~40 s; families "
                        "without nodule labels record why they were skipped)")
    p.add_argument("--rescore", action="store_true",
                   help="do not train: score the last finished run of --tag again (on --draws, and the probes "
                        "unless --no-probe) and append that as a row marked rescored")
    args = p.parse_args(argv)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        result = rescore(args, seed) if args.rescore else check(args, seed, train_flags)
        with args.results.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print("RESULT " + json.dumps({k: result[k] for k in ("tag", "family", "seed", "rescored", "ratio0", "ratio",
                                                              "x_untrained", "hits_mean", "hits_student_mean",
                                                              "hits0_mean",
                                                              "x_untrained_mean", "x_untrained_ci95", "below_wall", "seconds",
                                                              "probe_slice_nodule", "probe_patch_nodule")
                                           if k in result}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
