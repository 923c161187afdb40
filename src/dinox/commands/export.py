"""`dinox export CHECKPOINT --format FORMAT --out DIR [--network teacher|student]`: the
trained backbone of a dinox checkpoint, for the tools people load models with.

Formats (``dinox.model.weights`` writes the layouts):

``hf``           config.json + model.safetensors that ``transformers.AutoModel.from_pretrained(DIR)``
                 loads strictly: ``Dinov2WithRegistersModel`` for learned position embeddings
                 (``Dinov2Model`` without registers), ``DINOv3ViTModel`` for RoPE; the DINO head
                 in dino_head.safetensors (and an iBOT head in ibot_head.safetensors), their
                 DINOHead arguments in the metadata
``safetensors``  backbone.safetensors: dinox's own state dict, the architecture in its metadata
``dinov2-hub``   backbone.pth in the official DINOv2 key layout (learned positions), and
                 backbone.json with what that layout does not record (heads, LayerNorm eps)
``dinov3-hub``   backbone.pth (+ backbone.json) in the official DINOv3 key layout (RoPE)

Every format also gets ct_preprocessing.json (the HU windows and the normalisation the model
was trained with, from the checkpoint's configuration) and a model card README.md with the
provenance: checkpoint sha256 and step, git commit, data manifest hash, and the figures of any
``view_retrieval_step*.json`` that ``dinox eval retrieval`` left beside the checkpoint.
``dinox.load_backbone(DIR)`` reads the hf and safetensors folders back.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from dinox import __version__
from dinox.commands.argtypes import path_text
from dinox.data.augment import LUNG_WINDOW, WINDOW_FAMILY_NAMES, AugmentConfig
from dinox.errors import UserError
from dinox.eval.load import NETWORKS, load_for_inference
from dinox.model import weights
from dinox.run import checkpoint as store
from dinox.run.files import atomic_write, atomic_write_text
from dinox.run.signals import interrupts_raise

FORMATS = ("hf", "safetensors", "dinov2-hub", "dinov3-hub")
PREPROCESSING = weights.PREPROCESSING_FILE
# PREPROCESSING's "description": the mark by which --overwrite knows the folder of an earlier export
PREPROCESSING_DESCRIPTION = "CT preprocessing of the dinox run that trained this backbone (dinox.data.augment)"
HEAD_FILE = "dino_head.safetensors"
IBOT_HEAD_FILE = "ibot_head.safetensors"
# every file some export format writes: --overwrite removes these (and only these) from an
# earlier export's folder first, so that it never holds one export's weights beside another's
# README and preprocessing
EXPORT_FILES = ("config.json", "model.safetensors", HEAD_FILE, IBOT_HEAD_FILE, "backbone.safetensors",
                "backbone.pth", "backbone.json", PREPROCESSING, "README.md")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint's backbone for transformers, as safetensors or as a torch-hub file",
        description="Export the teacher (or student) backbone of a dinox checkpoint: a transformers "
                    "folder (--format hf), a safetensors state dict, or a .pth in the official "
                    "DINOv2 / DINOv3 key layout; with the CT preprocessing and a model card.",
    )
    parser.add_argument("checkpoint", type=path_text, metavar="CHECKPOINT", help="a dinox checkpoint_*.pth")
    parser.add_argument("--format", choices=FORMATS, default="hf", help="what to write (default hf)")
    parser.add_argument("--out", type=path_text, required=True, metavar="DIR",
                        help="output folder (created; must be empty, or an earlier export with --overwrite)")
    parser.add_argument("--network", choices=NETWORKS, default="teacher",
                        help="which network's backbone (default teacher, the EMA one DINO evaluates)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"write into the folder of an earlier export (it holds {PREPROCESSING}), replacing "
                             f"that export's files (other files are left alone)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # SIGTERM and SIGHUP too unwind, so that no temporary file is left and no part of an export
    with interrupts_raise(lambda sig: f"export stopped by {sig} before it finished; {args.out} keeps none of its "
                                      f"files but {PREPROCESSING}: run the same command again with --overwrite"):
        written = export_checkpoint(args.checkpoint, args.format, args.out, network=args.network,
                                    overwrite=args.overwrite)
    for path in written:
        print(path)
    return 0


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, *, network: str = "teacher",
                      overwrite: bool = False) -> list[Path]:
    """Write the export of ``checkpoint`` into the folder ``out``; returns the files written."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    checkpoint, out = Path(checkpoint), Path(out)
    check_out(out, overwrite)
    backbone, cfg, meta = load_for_inference(checkpoint, torch.device("cpu"), which=network)
    # refuse impossible layouts before anything is written
    if fmt == "dinov2-hub" and backbone.arch.rope:
        weights.dinov2_hub_state(backbone)
    if fmt == "dinov3-hub" and not backbone.arch.rope:
        weights.dinov3_hub_state(backbone)
    if fmt == "hf":
        weights.hf_config(backbone.arch, backbone.img_size, backbone.in_chans)
    info = {
        "checkpoint": checkpoint.name, "checkpoint_sha256": store.file_sha256(checkpoint),
        "step": meta.step, "network": network, "dinox_version": __version__,
        "provenance": meta.raw.get("provenance") or {},
        "retrieval": _retrieval_figures(checkpoint),
    }
    preprocessing = ct_preprocessing(cfg.views.to_augment(), cfg.views.img_size, backbone.patch_size,
                                     cfg.views.context_mm)
    net = meta.raw[network]
    # an iBOT run trains the mask token: the official and transformers layouts keep it in
    # the backbone (embeddings.mask_token), so it goes there instead of the initial zeros
    extras = {"mask_token": net["mask_token"]} if isinstance(net.get("mask_token"), torch.Tensor) else None
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write_export(out, fmt, backbone, net, extras, preprocessing, info, network)
    except BaseException as exc:
        # each file is written whole or not at all (atomic_write); the ones this export had
        # written go too, so that a folder holding part of an export never looks like all
        # of one. Its PREPROCESSING stays: it marks the folder as an export's for --overwrite
        for name in EXPORT_FILES:
            if name != PREPROCESSING:
                (out / name).unlink(missing_ok=True)
        error = _os_error(exc)
        if error is None:
            raise
        raise UserError(f"cannot write the export into {out} ({error.strerror or error}); free space there or give "
                        f"another --out, then run the same command again (with --overwrite for {out})") from None


def _write_export(out: Path, fmt: str, backbone, net: dict, extras: dict | None, preprocessing: dict, info: dict,
                  network: str) -> list[Path]:
    """The files of the export, each through an atomic write."""
    # first: it marks the folder as an export's, so that an export cut short is redone with --overwrite
    path = out / PREPROCESSING
    atomic_write_text(path, json.dumps(preprocessing, indent=2) + "\n")
    written = [path]
    for name in EXPORT_FILES:
        if name != PREPROCESSING:
            (out / name).unlink(missing_ok=True)
    if fmt == "hf":
        written += weights.write_hf_folder(out, backbone, extras)
        for prefix, file in (("head.", HEAD_FILE), ("ibot_head.", IBOT_HEAD_FILE)):
            head = {k[len(prefix):]: v for k, v in net.items() if k.startswith(prefix)}
            if head:
                written.append(weights.write_safetensors(out / file, head, head_metadata(head)))
    elif fmt == "safetensors":
        written.append(weights.write_backbone_safetensors(
            out / "backbone.safetensors", backbone, extras, metadata={"step": str(info["step"]), "network": network}))
    else:
        state = (weights.dinov2_hub_state if fmt == "dinov2-hub" else weights.dinov3_hub_state)(backbone, extras)
        path = out / "backbone.pth"
        atomic_write(path, lambda f: torch.save(state, f))
        # heads and LayerNorm eps are not in the official key layouts: dinox reads them here
        side = path.with_suffix(".json")
        atomic_write_text(side, json.dumps(weights.hub_sidecar(backbone), indent=2) + "\n")
        written += [path, side]
    path = out / "README.md"
    atomic_write_text(path, model_card(fmt, backbone, preprocessing, info))
    written.append(path)
    return written


def _os_error(exc: BaseException) -> OSError | None:
    """The file-system failure behind `exc` (a full disk, a folder gone read-only), or None;
    torch.save reports its writer's OSError as a RuntimeError whose context it is."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__context__ if isinstance(exc, RuntimeError) else None
    return None


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out the export would damage. Only an earlier export's folder is written
    into (with --overwrite): in a run folder or any other folder, config.json and README.md
    are someone else's work (a run's resolved configuration, a user's notes)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder (new, empty, or an earlier export with --overwrite)")
    if not out.exists() or not any(out.iterdir()):
        return
    names = [n for n in EXPORT_FILES if (out / n).exists()]
    replaced = f"; the export would replace its {', '.join(names)}" if names else ""
    signs = store.run_folder_signs(out)
    if signs:
        raise UserError(f"--out {out} is a training run folder (it holds {', '.join(signs[-3:])}){replaced}; "
                        f"give a new folder, e.g. {out / 'export'}")
    if not is_export_folder(out):
        raise UserError(f"--out {out} is not an empty folder and not an earlier dinox export (no {PREPROCESSING})"
                        f"{replaced}; give a new or empty folder")
    if not overwrite:
        raise UserError(f"--out {out} holds an earlier export; pass --overwrite to replace its files "
                        f"({', '.join(names)}), or give a new folder")


def is_export_folder(folder: Path) -> bool:
    """Whether `folder` holds the preprocessing file that every dinox export writes."""
    try:
        data = json.loads((folder / PREPROCESSING).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("description") == PREPROCESSING_DESCRIPTION


def head_metadata(head: dict[str, torch.Tensor]) -> dict[str, str]:
    """The DINOHead constructor arguments, read off the tensors (so that any head of the
    checkpoint, DINO or iBOT, can be rebuilt): Linear weights are the 2-D ``mlp.*`` tensors,
    BatchNorm layers the 1-D ``mlp.*.weight`` ones."""
    linears = sorted((int(k.split(".")[1]), v) for k, v in head.items()
                     if k.startswith("mlp.") and k.endswith(".weight") and v.ndim == 2)
    use_bn = any(k.startswith("mlp.") and k.endswith(".weight") and v.ndim == 1 for k, v in head.items())
    first, last = linears[0][1], linears[-1][1]
    if "last_layer.weight" in head:  # a plain Linear (--prototype-norm free)
        out_dim, norm = head["last_layer.weight"].shape[0], "free"
        layout = "none: last_layer.weight holds the prototypes"
    else:
        out_dim = head["last_layer.parametrizations.weight.original1"].shape[0]
        norm = "fixed" if bool(torch.all(head["last_layer.parametrizations.weight.original0"] == 1)) else "learned"
        layout = "last_layer weight = original0 * original1 / ||original1|| per row (original0: each prototype's norm)"
    return {"format": "pt", "class": weights.HEAD_CLASS, "in_dim": str(first.shape[1]),
            "out_dim": str(out_dim), "hidden_dim": str(first.shape[0] if len(linears) > 1 else 2048),
            "bottleneck_dim": str(last.shape[0]), "nlayers": str(len(linears)), "use_bn": str(use_bn),
            "prototype_norm": norm, "weight_norm": layout}


def _retrieval_figures(checkpoint: Path) -> list[dict]:
    """The results `dinox eval retrieval` wrote beside the checkpoint (any step)."""
    rows = []
    for file in sorted(checkpoint.parent.glob("view_retrieval_step*.json")):
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            keep = ("step", "n", "split", "network", "top1", "top5", "ratio", "baseline", "effective_rank")
            rows.append({"file": file.name, **{k: data[k] for k in keep if k in data}})
    return rows


def ct_preprocessing(aug: AugmentConfig, img_size: int, patch_size: int, context_mm: float = 0.0) -> dict:
    """The input the model was trained on (dinox.data.dataset, dinox.data.augment), as a
    JSON-able description."""
    default = AugmentConfig().window_families
    named = aug.window_families == default
    families = [{"name": WINDOW_FAMILY_NAMES[i] if named else f"window_{i}", "level_hu": c, "width_hu": w}
                for i, (c, w) in enumerate(aug.window_families)]
    return {
        "description": PREPROCESSING_DESCRIPTION,
        "input": {
            "layout": "(B, 3, H, W) float32",
            "channels": ["slice z-g", "slice z", "slice z+g"],
            "slice_gap": (f"g = max(1, floor({context_mm:g} mm / slice spacing + 0.5)): the slices nearest "
                          f"{context_mm:g} mm from slice z (1 at {context_mm:g} mm slices and thicker); in a series "
                          f"with gaps or uneven steps, the slice whose position lies nearest {context_mm:g} mm above "
                          f"and below z, at least one slice away") if context_mm
            else "g = 1: the adjacent slices",
            "context_mm": context_mm,
            "source": "int16 Hounsfield units clipped to [-1024, 3071], slices ascending along the normal",
            "edges": "a neighbour beyond the first or last slice is that border slice",
        },
        "image_size": img_size,
        "patch_size": patch_size,
        # the order matters at edges of the window: training resamples HU, then windows
        "resize": "the HU stack first, bilinear (antialiased where it shrinks), then the window",
        "window": "y = clamp((hu - (level - width / 2)) / width, 0, 1)",
        "normalisation": {"formula": "x = (y - mean) / std", "mean": aug.norm_mean, "std": aug.norm_std},
        "standardize_per_image": aug.standardize,
        "standardize_formula": "x = (x - mean(x)) / (std(x) + 1e-5) over channels and pixels of each image"
                               if aug.standardize else None,
        "training_windows": {
            "families": families,
            "center_jitter": aug.center_jitter,
            "width_jitter": list(aug.width_jitter),
            "rule": "level = L + W * U(-center_jitter, center_jitter), width = W * exp(U(log a, log b)) "
                    "for (a, b) = width_jitter; each view draws a family uniformly",
            "distinct_global_windows": aug.distinct_global_windows,
        },
        "inference_window": {"name": "lung", "level_hu": LUNG_WINDOW[0], "width_hu": LUNG_WINDOW[1],
                             "note": "one fixed window with the same normalisation, as dinox's monitor "
                                     "feeds it (dinox.data.augment.fixed_window_input); any family above "
                                     "is in the training distribution"},
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


# The official constructors (facebookresearch/dinov2 and /dinov3 models/vision_transformer.py)
# whose models the dinov2-hub / dinov3-hub state dicts fill strictly with dinox's features.
OFFICIAL_IMPORT = "from {repo}.models.vision_transformer import DinoVisionTransformer  # facebookresearch/{repo}"
# DINOv3's norm_layer names (norm_layer_dict) by LayerNorm eps; DINOv2 fixes 1e-6
DINOV3_NORMS = {1e-6: "layernorm", 1e-5: "layernormbf16"}
DINOV2_EPS = 1e-6
FEATURES = {"dinov2-hub": "x_norm_clstoken, x_norm_regtokens, x_norm_patchtokens",
            "dinov3-hub": "x_norm_clstoken, x_storage_tokens, x_norm_patchtokens"}


def _ffn_ratio(arch) -> int | float:
    """The MLP ratio of the official codes, which size the MLP (and SwiGLU's 2/3 of it, rounded
    up to a multiple of 8 as dinox does) as ``int(embed_dim * ratio)``: the ratio whose product
    is dinox's GELU-equivalent width (a float quotient can fall one short of it)."""
    ratio = arch.mlp_dim / arch.embed_dim
    if ratio == int(ratio):
        return int(ratio)
    while int(arch.embed_dim * ratio) < arch.mlp_dim:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _official_kwargs(fmt: str, backbone) -> dict:
    """The official DinoVisionTransformer's keyword arguments for the hub layout ``fmt``."""
    arch = backbone.arch
    shape = {"img_size": backbone.img_size, "patch_size": arch.patch_size,
             **({"in_chans": backbone.in_chans} if backbone.in_chans != 3 else {}),
             "embed_dim": arch.embed_dim, "depth": arch.depth, "num_heads": arch.num_heads}
    # both build LayerScale only for a truthy init value, and both hub states hold its gammas
    # (ones for a backbone without LayerScale: x * 1 is x); the value is overwritten on loading
    layerscale = arch.layerscale_init or 1.0
    if fmt == "dinov2-hub":
        # DINOv2's defaults (interpolate_offset 0.1, or antialiasing in its register models)
        # resample the position embeddings otherwise than dinox: ~1e-2 off the training size
        return {**shape, "ffn_layer": "swiglufused" if arch.swiglu else "mlp", "mlp_ratio": _ffn_ratio(arch),
                "qkv_bias": arch.qkv_bias, "init_values": layerscale, "num_register_tokens": arch.num_registers,
                "block_chunks": 0, "interpolate_offset": 0.0, "interpolate_antialias": False}
    return {
        **shape,
        # dinox's RoPE: periods base ** (4k / head_dim), patch centres in [-1, 1] per axis
        # ("separate"), float32 tables (DINOv3's default is bf16), and no coordinate shift, jitter or
        # rescaling (training augmentations of DINOv3 that dinox does not have)
        "pos_embed_rope_base": arch.rope_base, "pos_embed_rope_min_period": None,
        "pos_embed_rope_max_period": None, "pos_embed_rope_normalize_coords": "separate",
        "pos_embed_rope_shift_coords": None, "pos_embed_rope_jitter_coords": None,
        "pos_embed_rope_rescale_coords": None, "pos_embed_rope_dtype": "fp32",
        "ffn_layer": "swiglu" if arch.swiglu else "mlp", "ffn_ratio": _ffn_ratio(arch),
        "qkv_bias": arch.qkv_bias, "proj_bias": True, "ffn_bias": True,
        "mask_k_bias": arch.mask_k_bias and arch.qkv_bias, "layerscale_init": layerscale,
        "norm_layer": DINOV3_NORMS.get(arch.ln_eps, f"layernorm_eps{arch.ln_eps:g}"),
        "n_storage_tokens": arch.num_registers,
        # one final norm for every token, as dinox has
        "untie_cls_and_patch_norms": False, "untie_global_and_local_cls_norm": False,
    }


def _call_lines(head: str, kwargs: dict, tail: str, width: int = 100) -> list[str]:
    """``head(key=value, ...)tail`` as Python lines of at most ~``width`` characters."""
    lines, line = [], head + "("
    indent = " " * len(line)
    parts = [f"{key}={value!r}" for key, value in kwargs.items()]
    for i, part in enumerate(parts):
        part += ")" + tail if i == len(parts) - 1 else ","
        if line.endswith("("):
            line += part
        elif len(line) + 1 + len(part) > width:
            lines.append(line)
            line = indent + part
        else:
            line += " " + part
    return lines + [line]


def _official_constructor(fmt: str, backbone) -> list[str]:
    """The card's lines that build the official model which ``fmt``'s backbone.pth loads into
    strictly and which computes dinox's features (as far as the official code can; a comment
    says where it cannot)."""
    kwargs = _official_kwargs(fmt, backbone)
    repo = fmt.split("-")[0]
    eps = backbone.arch.ln_eps
    lines = [OFFICIAL_IMPORT.format(repo=repo)]
    if fmt == "dinov3-hub" and eps not in DINOV3_NORMS:
        lines += [f"# dinox's LayerNorm eps {eps:g} is neither of DINOv3's norm_layer choices "
                  f"({', '.join(f'{n!r} {e:g}' for e, n in DINOV3_NORMS.items())}): add it",
                  "import functools, torch, dinov3.models.vision_transformer as dv3",
                  f"dv3.norm_layer_dict[{kwargs['norm_layer']!r}] = functools.partial(torch.nn.LayerNorm, eps={eps!r})"]
    lines += _call_lines("model = DinoVisionTransformer", kwargs, ".eval()")
    if fmt == "dinov2-hub" and eps != DINOV2_EPS:
        lines.append(f"# dinox's LayerNorm eps is {eps:g}; DINOv2's DinoVisionTransformer fixes {DINOV2_EPS:g} "
                     "(no argument sets it), so its features differ slightly from dinox's")
    return lines


def _resampling_note(fmt: str, hf_class: str) -> str:
    """How the learned position embeddings are resampled at another input size, and which
    loader of this export reproduces the checkpoint's features there."""
    own = ("`dinox.load_backbone` on this export resamples as dinox does, so its features equal the "
           "checkpoint's at every size.")
    head = "the position embeddings are resampled bicubically (no antialiasing, no offset). "
    if fmt == "hf" and hf_class == "Dinov2WithRegistersModel":
        return (head + "transformers' Dinov2WithRegistersModel antialiases when it does, dinox does not, so "
                "away from the training size the two differ slightly (at the training size they agree). " + own)
    if fmt == "hf":
        return head + f"transformers' {hf_class} resamples the same way, so its features equal the checkpoint's " \
                      "at every size; so do `dinox.load_backbone`'s."
    if fmt == "dinov2-hub":
        return (head + "The constructor above (interpolate_offset=0.0, interpolate_antialias=False) does the "
                "same; DINOv2's defaults (offset 0.1, or antialiasing in its register models) differ slightly "
                "away from the training size. " + own)
    return head + own


def model_card(fmt: str, backbone, preprocessing: dict, info: dict) -> str:
    """README.md: what the model is, what it eats, how to load it, where it came from."""
    arch = backbone.arch
    prov = info["provenance"]
    hf_class = weights.hf_class(arch)
    windows = ", ".join(f"{f['name']} L{f['level_hu']:g}/W{f['width_hu']:g}"
                        for f in preprocessing["training_windows"]["families"])
    norm = preprocessing["normalisation"]
    r = arch.num_registers
    lines = [
        "---",
        "library_name: transformers" if fmt == "hf" else "library_name: dinox",
        "pipeline_tag: image-feature-extraction",
        "tags: [dinox, computed-tomography, self-supervised, dino, vision-transformer]",
        "---",
        "",
        f"# dinox CT backbone ({info['network']}, step {info['step']})",
        "",
        "A Vision Transformer pretrained with dinox (DINOv3-style self-distillation with Gram "
        "anchoring) on 2.5D CT slices. It is a feature extractor: the DINO head is not part of "
        "the backbone" + (f" (it is in `{HEAD_FILE}`)." if fmt == "hf" else "."),
        "",
        "## Architecture",
        "",
        f"`{weights.describe(arch)}`; trained at {backbone.img_size} px "
        f"({backbone.grid_size}x{backbone.grid_size} patches). Output tokens: "
        f"`[class, {r} register{'s' if r != 1 else ''}, patches row-major]`, final LayerNorm applied.",
        "",
        "## Input",
        "",
        f"Three slices (z-g, z, z+g; {preprocessing['input']['slice_gap']}) in Hounsfield units as the 3 "
        f"channels, resized to the input size first ({preprocessing['resize']}), then windowed "
        f"`{preprocessing['window']}`, then `{norm['formula']}` with mean {norm['mean']:g}, std "
        f"{norm['std']:g}" + (", then standardised per image" if preprocessing["standardize_per_image"] else "")
        + f". Training drew the window from: {windows} (jittered). For inference use one fixed window, "
        f"e.g. lung L{LUNG_WINDOW[0]:g}/W{LUNG_WINDOW[1]:g}. Everything is in `{PREPROCESSING}`.",
        "",
        "## Use",
        "",
        "```python",
    ]
    if fmt == "hf":
        lines += [
            "from transformers import AutoModel",
            f"model = AutoModel.from_pretrained(FOLDER).eval()   # {hf_class}",
            "out = model(pixel_values=x)                           # x: (B, 3, H, W) as above",
            "cls, tokens = out.pooler_output, out.last_hidden_state",
        ]
    elif fmt == "safetensors":
        lines += ["import dinox", "backbone = dinox.load_backbone(FOLDER)   # or FOLDER/backbone.safetensors",
                  "out = backbone(x)   # {'cls', 'registers', 'patches'}"]
    else:
        lines += ["import torch", *_official_constructor(fmt, backbone)]
        lines += ["model.load_state_dict(torch.load(FOLDER + '/backbone.pth', weights_only=True))",
                  f"out = model.forward_features(x)   # {FEATURES[fmt]}",
                  "# or: dinox.load_backbone(FOLDER + '/backbone.pth')"]
    lines += [
        "```",
        "",
        "Inputs of another size work (multiples of the patch size): "
        + ("RoPE adapts to any grid." if arch.rope else _resampling_note(fmt, hf_class)),
        "",
        "## Provenance",
        "",
        f"- checkpoint: `{info['checkpoint']}` (sha256 `{info['checkpoint_sha256']}`), step {info['step']}, "
        f"{info['network']} network",
        f"- code: dinox {info['dinox_version']}, git commit `{prov.get('git_commit', 'unknown')}`",
        f"- data manifest hash: `{prov.get('data_manifest_hash', 'unknown')}`",
    ]
    for key in ("torch", "device_name", "seed", "started_at", "init_from"):
        if prov.get(key) is not None:
            lines.append(f"- {key}: {_fmt(prov[key]) if not isinstance(prov[key], dict) else json.dumps(prov[key])}")
    lines += ["", "## Evaluation", ""]
    if info["retrieval"]:
        lines += ["Label-free view retrieval (`dinox eval retrieval`: two augmented views of n validation "
                  "slices, top-k of view 1 among all view 2; ratio = top1 x n, chance = 1):", "",
                  "| file | step | split | n | top1 | top5 | ratio | effective rank |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in info["retrieval"]:
            lines.append("| " + " | ".join(_fmt(row.get(k)) for k in
                                            ("file", "step", "split", "n", "top1", "top5", "ratio", "effective_rank")) + " |")
    else:
        lines.append("No `view_retrieval_step*.json` beside the checkpoint: run `dinox eval retrieval` on it.")
    lines += ["", "## Architecture record", "", "```json", json.dumps(asdict(arch), indent=2), "```", ""]
    return "\n".join(lines)
