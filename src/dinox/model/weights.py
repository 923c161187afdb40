"""Backbone weights in and out of dinox: the released DINOv2 / DINOv3 files, folders saved
by transformers, and plain safetensors.

Import (``load_pretrained`` / ``init_backbone_from``) reads

- ``dinov2-hub``: a torch-hub DINOv2 state dict (``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``):
  ``cls_token``, ``pos_embed`` (1, 1 + N, D) whose first row is the class token's position,
  ``register_tokens`` (``_reg`` models), ``mask_token``, ``patch_embed.proj``,
  ``blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1/fc2 | mlp.w12/w3, ls2.gamma}``,
  ``norm`` (dinov2/models/vision_transformer.py; ViT-g's SwiGLU keeps W1 and W2 fused in w12);
- ``dinov3-hub``: a DINOv3 state dict (``dinov3_vit*16*_pretrain_*.pth``): no position
  embedding but a ``rope_embed.periods`` buffer, ``storage_tokens`` (the registers),
  ``attn.qkv.bias_mask`` (the key bias masked to zero), SwiGLU as separate w1/w2/w3
  (dinov3/models/vision_transformer.py, dinov3/layers/*);
- ``hf-dinov2`` / ``hf-dinov2-registers`` / ``hf-dinov3``: a folder written by transformers'
  ``save_pretrained`` for ``Dinov2Model``, ``Dinov2WithRegistersModel`` or ``DINOv3ViTModel``
  (config.json + model.safetensors, sharded safetensors or pytorch_model.bin), whose separate
  query/key/value projections are fused back into dinox's qkv;
- ``dinox-safetensors``: a backbone written by ``dinox export --format safetensors``.

The architecture is read from the file (shapes, config.json, the RoPE periods) and compared
with the backbone it is loaded into; a difference is a UserError naming both shapes. Every
tensor of the source is used or checked (the RoPE periods and the key-bias mask against
their formulas); an unknown or a missing tensor is an error, and nothing is loaded then.
What dinox folds or does not use is kept in ``Imported.extras`` so that an unchanged model
exports bit for bit what was imported:

- the class token's position (DINOv2) is added into dinox's class token, which has none:
  ``cls + pos[0]`` is exactly what the source adds in its forward pass;
- ``mask_token`` (iBOT's masked-patch token) is not part of dinox's backbone (an iBOT run
  keeps its own beside it);
- DINOv3's ``local_cls_norm`` (a norm for local crops' class tokens that its evaluation never
  uses) is not used.

Position embeddings trained on another grid are resampled once, at import, with the
source's own convention (``dinox.model.vit.resample_token_grid``): transformers' Dinov2Model
bicubic to the size, Dinov2WithRegistersModel and the torch-hub ``_reg`` models
additionally antialiased, the torch-hub models without registers with DINOv2's
``interpolate_offset`` of 0.1 (transformers 5.x modeling_dinov2*.py, dinov2/hub/backbones.py).

Export writes the inverse layouts: ``hf_state`` (+ ``hf_config``) for transformers,
``dinov2_hub_state`` / ``dinov3_hub_state`` for the official code, and dinox's own state dict
as safetensors with the architecture in its metadata. Safetensors is read and written here
(the format is a JSON header and raw little-endian tensor bytes), so exporting needs no
extra package.

Files are loaded with ``torch.load(weights_only=True)``: a pickle that carries code is
refused before anything in it runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dinox.errors import UserError
from dinox.model.presets import PRESETS
from dinox.model.vit import (ViTArch, VisionTransformer, resample_token_grid, rope_periods,
                             swiglu_hidden_dim)
from dinox.run import sharded as sharded_store
from dinox.run.checkpoint import content_problem, file_sha256, list_checkpoints, run_folder_signs
from dinox.run.files import atomic_write
from dinox.run.torch_file import (NotATorchFile, first_line, is_weights_only_refusal, load_weights_only,
                                  refusal_detail)

log = logging.getLogger("dinox.weights")

DINOV2_HUB = "dinov2-hub"
DINOV3_HUB = "dinov3-hub"
HF_DINOV2 = "hf-dinov2"
HF_DINOV2_REG = "hf-dinov2-registers"
HF_DINOV3 = "hf-dinov3"
DINOX_SAFETENSORS = "dinox-safetensors"
DINOX_CHECKPOINT = "dinox-checkpoint"

HF_MODEL_TYPES = {"dinov2": HF_DINOV2, "dinov2_with_registers": HF_DINOV2_REG, "dinov3_vit": HF_DINOV3}
HF_CLASSES = {HF_DINOV2: "Dinov2Model", HF_DINOV2_REG: "Dinov2WithRegistersModel", HF_DINOV3: "DINOv3ViTModel"}
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
DINOX_BACKBONE_FORMAT = "dinox-backbone"
# Written beside the weights of every dinox export (the HU windows and normalisation the
# model was trained with); its presence also says the export is dinox's own.
PREPROCESSING_FILE = "ct_preprocessing.json"
# the "class" metadata of the head files dinox export writes beside a backbone
HEAD_CLASS = "dinox.model.head.DINOHead"
# DINOv2 and DINOv3 use 64-channel heads in every released model; DINOv2 files do not
# record the head count, so this fills it in when no target architecture says otherwise.
DEFAULT_HEAD_DIM = 64


@dataclass
class Imported:
    """Backbone weights read from a file, in dinox's layout.

    ``state`` holds exactly the keys of ``VisionTransformer(arch).state_dict()``, with the
    position embedding (learned positions only) on the source's ``grid``; ``interp`` is the
    source's (offset, antialias) resampling convention; ``extras`` the source tensors that
    dinox folds or does not use; ``checked`` the buffers consumed after checking them.
    """

    kind: str
    path: Path
    arch: ViTArch
    state: dict[str, torch.Tensor]
    grid: tuple[int, int] | None = None
    img_size: int | None = None
    in_chans: int = 3
    interp: tuple[float, bool] = (0.0, False)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    heads_known: bool = True

    @property
    def sha256(self) -> str:
        """The file's sha256; for a folder, the sha256 of its sorted ``name sha256`` lines."""
        if len(self.files) == 1:
            return next(iter(self.files.values()))
        lines = "".join(f"{name} {digest}\n" for name, digest in sorted(self.files.items()))
        return hashlib.sha256(lines.encode()).hexdigest()


# ----------------------------------------------------------------------------- architecture

def describe(arch: ViTArch) -> str:
    """One-line description of a backbone's shape, e.g. for error messages."""
    return ", ".join(f"{k} {v}" for k, v in _signature(arch).items())


def _ffn_hidden(arch: ViTArch) -> int:
    return swiglu_hidden_dim(arch.mlp_dim) if arch.swiglu else arch.mlp_dim


def _signature(arch: ViTArch) -> dict[str, object]:
    """What decides the tensors and the function of a backbone (not how it is trained)."""
    sig: dict[str, object] = {
        "patch": arch.patch_size, "dim": arch.embed_dim, "depth": arch.depth,
        "heads": arch.num_heads,
        "mlp": f"{'SwiGLU' if arch.swiglu else 'GELU'} {_ffn_hidden(arch)}",
        "registers": arch.num_registers,
        "LayerScale": "yes" if arch.layerscale_init is not None else "no",
        "qkv bias": "yes" if arch.qkv_bias else "no",
        "positions": f"RoPE base {arch.rope_base:g}" if arch.rope else "learned",
    }
    if arch.rope and arch.qkv_bias:
        # without RoPE a key bias adds the same logit to a whole softmax row: no effect
        sig["key bias"] = "masked" if arch.mask_k_bias else "learned"
    sig["LayerNorm eps"] = f"{arch.ln_eps:g}"
    return sig


_FIXES = {
    "patch": "--vit-patch", "dim": "--vit-dim", "depth": "--vit-depth", "heads": "--vit-heads",
    "mlp": "--vit-mlp / --swiglu", "registers": "--registers", "LayerScale": "--layerscale",
}


def matching_preset(arch: ViTArch) -> str | None:
    """The name of a preset with the shape of ``arch`` up to registers and LayerScale."""
    want = _signature(arch)
    for name, preset in PRESETS.items():
        have = _signature(dataclasses.replace(preset, num_registers=arch.num_registers,
                                              layerscale_init=arch.layerscale_init))
        if have == want:
            return name
    return None


def _preset_of_layout(arch: ViTArch) -> str | None:
    """The preset nearest ``arch`` among those of its layout (what no --vit-* flag sets:
    positions, key and qkv bias, LayerNorm eps): of its width if one is, else of its MLP."""
    layout = {k: v for k, v in _signature(arch).items() if k not in _FIXES}
    same = [name for name, preset in PRESETS.items()
            if {k: v for k, v in _signature(preset).items() if k not in _FIXES} == layout]
    return min(same, key=lambda name: (PRESETS[name].embed_dim != arch.embed_dim,
                                       PRESETS[name].swiglu != arch.swiglu), default=None)


def check_arch(src: Imported, target: ViTArch) -> None:
    """UserError naming both shapes unless ``src`` fits a backbone of ``target``'s shape."""
    have = _signature(src.arch)
    want = _signature(target)
    if not src.heads_known:
        have["heads"] = want["heads"]
    if have["LayerScale"] != want["LayerScale"] and _layerscale_is_identity(src):
        have["LayerScale"] = want["LayerScale"]  # gammas of 1 are no LayerScale, exactly
    diff = [k for k in want if have.get(k) != want[k]] + [k for k in have if k not in want]
    if not diff:
        return
    fixes = sorted({_FIXES[k] for k in diff if k in _FIXES})
    preset = matching_preset(src.arch)
    base = None if preset else _preset_of_layout(src.arch) if set(diff) - _FIXES.keys() else None
    registers = f" --registers {src.arch.num_registers}" if "registers" in diff else ""
    if base is not None:   # the layout (RoPE, LayerNorm eps...) comes with a preset only
        base_sig = _signature(dataclasses.replace(PRESETS[base], num_registers=src.arch.num_registers))
        fixes = sorted({_FIXES[k] for k, v in _signature(src.arch).items() if k in _FIXES and base_sig[k] != v})
        hint = f"--config {base}{registers}" + (f" and {', '.join(fixes)} set to the weights' shape" if fixes else "")
    else:
        hint = (f"--config {preset}" if preset else "the matching --vit-* flags") + registers
        if fixes:
            hint += f" (flags: {', '.join(fixes)})"
    parts = "; ".join(f"{k} {have.get(k, '-')} vs {want.get(k, '-')}" for k in diff)
    raise UserError(f"{src.path} holds a {src.kind} backbone of shape [{describe(src.arch)}] but the "
                    f"requested architecture is [{describe(target)}] ({parts}); train with {hint}")


def _layerscale_is_identity(src: Imported) -> bool:
    gammas = [v for k, v in src.state.items() if k.endswith((".ls1.gamma", ".ls2.gamma"))]
    return bool(gammas) and all(bool((g == 1).all()) for g in gammas)


# ----------------------------------------------------------------------------- safe reading

def safe_torch_load(path: Path):
    """``torch.load(weights_only=True)`` (memory-mapped when the format allows), with
    one-line UserErrors for a pickle that carries code or a file that is no checkpoint."""
    try:
        return load_weights_only(path, mmap=True)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # torch raises KeyError, EOFError, RuntimeError... for non-checkpoints
        if is_weights_only_refusal(exc):
            raise UserError(f"{path} holds pickled code or objects besides tensors ({refusal_detail(exc)}); it "
                            f"was not loaded: use weights saved as a plain state dict by a source you "
                            f"trust") from None
        what = str(exc) if isinstance(exc, NotATorchFile) else f"is not a PyTorch checkpoint ({first_line(exc)})"
        raise UserError(f"{path} {what}") from None


# Where training code keeps a backbone's state dict, tried in this order: DINOv2 saves its
# EMA teacher as {"teacher": {"backbone.…", "dino_head.…"}} (teacher_checkpoint.pth) and its
# whole run as {"model": {"student.backbone.…", "teacher.backbone.…"}, "optimizer": …}; others
# save {"state_dict": …}, and DDP prefixes every name with "module.".
_WRAPPERS = ("teacher", "model", "state_dict", "module")
_BACKBONE_PREFIXES = ("teacher.backbone.", "backbone.")


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrapped(obj) -> tuple[object, list[str]]:
    """The backbone's tensors inside a training checkpoint's wrapper (_WRAPPERS), without
    DDP's "module." prefix, and of a model with heads the backbone's alone (the EMA teacher's
    where the file holds both networks, as DINOv2 evaluates), with what was read in words;
    anything else as it is."""
    read: list[str] = []
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        found = next((key for key in _WRAPPERS if _is_tensor_dict(obj.get(key))), None)
        if found is None:
            return obj, read
        obj = obj[found]
        read.append(f"the tensors under its {found!r} entry")
    if not _is_tensor_dict(obj):
        return obj, read
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in obj):
            read.append(f"its {prefix}* tensors (the heads beside them are left out)")
            return {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}, read
    return obj, read


def _tensor_dict(obj, path: Path, announce: bool = False) -> dict[str, torch.Tensor]:
    """The backbone state dict in `obj` (see _unwrapped); with `announce` (where the weights
    are read, not merely recognised) the log says what of a wrapped file was read."""
    obj, read = _unwrapped(obj)
    if read and announce:
        log.info("%s: reading %s", path, "; ".join(read))
    if not _is_tensor_dict(obj):
        raise UserError(f"{path} is not a backbone state dict (expected a dict of tensors, as the "
                        f"torch-hub DINOv2/DINOv3 files are, or one under a training checkpoint's "
                        f"{', '.join(repr(k) for k in _WRAPPERS)} entry)")
    return obj


# safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
# data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the raw bytes
# (https://github.com/huggingface/safetensors, "Format").
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as a safetensors file (atomically: temporary name, then rename)."""
    if sys.byteorder != "little":
        raise UserError("writing safetensors needs a little-endian machine")
    path = Path(path)
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
    # larger elements first keeps every tensor aligned to its element size
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    blobs, offset = [], 0
    for name in names:
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _ST_NAMES:
            raise UserError(f"cannot write {name} of dtype {t.dtype} as safetensors")
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + raw.numel()]}
        blobs.append(raw)
        offset += raw.numel()
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f) -> None:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw.numpy().data)

    atomic_write(path, write)   # a full disk or Ctrl-C leaves no temporary file the size of the model
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; the header is validated before any tensor
    is made (the data stays memory-mapped, copy-on-write)."""
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    header, metadata, start = _safetensors_header(path)
    data_len = size - start
    spans = {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{bad} (entry {name!r}: {info!r:.80})") from None
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len \
                or end - begin != math.prod(shape) * itemsize:
            raise UserError(f"{bad} (entry {name!r} does not fit the file)")
        spans[name] = (dtype, shape, begin, end, itemsize)
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)[start:]
    tensors = {}
    for name, (dtype, shape, begin, end, itemsize) in spans.items():
        if begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = data[begin:end]
        if (start + begin) % itemsize:
            raw = raw.clone()  # a view as a wider dtype needs an aligned start
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


# ----------------------------------------------------------------------------- detection

def _is_dinox_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("teacher"), dict) \
        and isinstance(obj.get("student"), dict) and "format" in obj


def detect_source(path: str | os.PathLike) -> str:
    """The kind of weights at ``path`` (one of the module's source names), or UserError."""
    path = Path(path)
    if path.is_dir() and sharded_store.is_sharded(path) and (path / sharded_store.MANIFEST).is_file():
        return DINOX_CHECKPOINT  # a sharded (DCP) dinox checkpoint
    if path.is_dir():
        _refuse_run_folder(path)
        if (path / "config.json").is_file():
            return _hf_kind(_read_config(path), path)
        if _dinox_safetensors_in(path):
            return DINOX_SAFETENSORS
        hub_file = _dinox_hub_in(path)
        if hub_file is not None:  # a `dinox export --format dinov2-hub / dinov3-hub` folder
            return detect_source(hub_file)
        raise UserError(f"folder {path} has no config.json; point at a folder written by transformers' "
                        f"save_pretrained or by dinox export (config.json + model.safetensors), or at a "
                        f".pth / .safetensors file")
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a .pth file, a .safetensors file or a folder "
                        f"with config.json")
    if path.suffix == ".safetensors":
        meta = _safetensors_header(path)[1]
        if meta.get("format_dinox") == DINOX_BACKBONE_FORMAT:
            return DINOX_SAFETENSORS
        if meta.get("class") == HEAD_CLASS:
            raise UserError(f"{path} holds a projection head ({HEAD_CLASS}), not a backbone; give the export "
                            f"folder {path.parent} or its backbone weights file")
        if (path.parent / "config.json").is_file():
            return _hf_file_kind(path)
        raise UserError(f"{path} records no architecture (no dinox metadata, no config.json beside it); "
                        f"keep it in its folder with config.json and give the folder")
    if _is_hf_bin(path):   # pytorch_model.bin: its names need config.json, as model.safetensors' do
        return _hf_file_kind(path)
    obj = safe_torch_load(path)
    if _is_dinox_checkpoint(obj):
        return DINOX_CHECKPOINT
    return _hub_kind(_tensor_dict(obj, path))


def _hf_file_kind(path: Path) -> str:
    """The kind of a weight file of a transformers folder, which is read as its folder (with
    config.json). Another file there is refused: the folder's weights would be read, not it,
    and loading them would answer another question."""
    kind = _hf_kind(_read_config(path.parent), path.parent)
    names = _hf_weight_names(path.parent)
    if path.name not in names:
        raise UserError(f"{path} is not the model weights of {path.parent} (those are "
                        f"{', '.join(names)}); give the folder or its {names[0]}")
    return kind


def _is_hf_bin(path: Path) -> bool:
    """A transformers weight file (pytorch_model*.bin) with the folder's config.json beside it."""
    return path.suffix == ".bin" and path.name.startswith("pytorch_model") \
        and (path.parent / "config.json").is_file()


def _dinox_hub_in(folder: Path) -> Path | None:
    """The one official-layout .pth in ``folder`` that dinox export wrote (it has a dinox
    sidecar .json), or None."""
    found = [f for f in sorted(folder.glob("*.pth")) if _hub_sidecar(f) is not None]
    return found[0] if len(found) == 1 else None


def _refuse_run_folder(folder: Path) -> None:
    """A run folder's config.json is the run's configuration, not a model's: point at its
    newest checkpoint instead of reading it as a transformers folder."""
    if not run_folder_signs(folder):
        return
    checkpoints = list_checkpoints(folder)
    hint = (f"give one of its checkpoints, e.g. {checkpoints[-1]} (for --init-from, what `dinox export "
            f"{checkpoints[-1]} --format safetensors` writes)" if checkpoints
            else "it holds no checkpoint yet; give a checkpoint_*.pth of a run that saved one")
    raise UserError(f"{folder} is a dinox training run folder, not model weights; {hint}")


def _hub_kind(state: dict) -> str:
    if "rope_embed.periods" in state or "storage_tokens" in state or \
            any(k.endswith("attn.qkv.bias_mask") for k in state):
        return DINOV3_HUB
    return DINOV2_HUB


def _safetensors_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, offset of the data) of a safetensors file."""
    bad = f"{path} is not a valid safetensors file"
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UserError(f"{bad} (shorter than its header)")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(path.stat().st_size - 8, 100 << 20):
            raise UserError(f"{bad} (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise UserError(f"{bad} ({first_line(exc)})") from None
    if not isinstance(header, dict):
        raise UserError(f"{bad} (header is no JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise UserError(f"{bad} (__metadata__ is no JSON object)")
    return header, meta, 8 + n


def _dinox_safetensors_in(folder: Path) -> Path | None:
    for candidate in sorted(folder.glob("*.safetensors")):
        try:
            if _safetensors_header(candidate)[1].get("format_dinox") == DINOX_BACKBONE_FORMAT:
                return candidate
        except (UserError, OSError):
            continue
    return None


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / 'config.json'} is not readable JSON ({first_line(exc)})") from None
    if not isinstance(config, dict):
        raise UserError(f"{folder / 'config.json'} is not a JSON object")
    return config


def _hf_kind(config: dict, folder: Path) -> str:
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise UserError(f"{folder / 'config.json'} describes model_type {model_type!r}; dinox reads "
                        f"{', '.join(HF_MODEL_TYPES)} (Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel)")
    return HF_MODEL_TYPES[model_type]


# ----------------------------------------------------------------------------- reading sources

# Name parts of a ViT's patch embedding and blocks in the layouts read here.
_VIT_PARTS = ("patch_embed", "blocks.", "patch_embeddings", "encoder.layer", "layer.")


class _Keys:
    """The source's tensors, each handed out once: whatever is left was not understood."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path, what: str):
        self.t, self.path, self.what = dict(tensors), path, what
        # judged on every tensor, before any is taken: by its last block, the ones left of a
        # complete ViT but one are no longer recognisable as one
        self.is_vit = any(part in k for k in self.t for part in _VIT_PARTS)

    def take(self, key: str) -> torch.Tensor:
        if key not in self.t:
            if not self.is_vit:
                names = sorted(self.t)
                raise UserError(f"{self.path} is no ViT: none of its {len(names)} tensors is a patch embedding or "
                                f"a transformer block (e.g. {', '.join(names[:3])}); give a DINOv2 or DINOv3 "
                                f"backbone (a torch-hub .pth, a transformers folder) or a dinox export")
            raise UserError(f"{self.path} has no tensor {key!r}: not a complete {self.what} backbone; "
                            f"nothing was loaded")
        return self.t.pop(key)

    def opt(self, key: str) -> torch.Tensor | None:
        return self.t.pop(key, None)

    def has(self, key: str) -> bool:
        return key in self.t

    def count(self, pattern: str) -> int:
        """Number of distinct indices i for keys matching ``pattern`` (with one ``(\\d+)``)."""
        found = {int(m.group(1)) for k in self.t if (m := re.match(pattern, k))}
        if found and found != set(range(len(found))):
            raise UserError(f"{self.path}: block indices are not 0..{len(found) - 1}: {sorted(found)[:8]}")
        return len(found)

    def finish(self) -> None:
        if self.t:
            names = sorted(self.t)
            more = f" and {len(names) - 6} more" if len(names) > 6 else ""
            head = (" (a classification head: save the backbone alone, e.g. the model's .dinov2 with "
                    "save_pretrained, and give that)" if all(n.startswith("classifier.") for n in names) else "")
            raise UserError(f"{self.path} has {len(names)} tensor(s) that a dinox backbone has no place "
                            f"for: {', '.join(names[:6])}{more}; nothing was loaded (a partial load "
                            f"would go unnoticed){head}")


def _grid_of(n: int, path: Path) -> tuple[int, int]:
    g = math.isqrt(n)
    if g * g != n:
        raise UserError(f"{path}: {n} position embeddings do not form a square grid")
    return g, g


def _gelu_width(hidden: int, prefer: int | None, dim: int, path: Path) -> int:
    """A GELU-equivalent MLP width whose DINOv2 SwiGLU width is ``hidden`` (several are):
    the requested one if it fits, else a round ratio of ``dim`` (DINOv2 ViT-g: 4 x 1536),
    else the nearest to 3/2 x hidden."""
    guess = hidden * 3 // 2
    candidates = [prefer] if prefer is not None else []
    candidates += [r * dim for r in (4, 6, 3, 2, 8)]
    candidates += sorted(range(max(guess - 16, 1), guess + 17), key=lambda m: abs(m - guess))
    for m in candidates:
        if swiglu_hidden_dim(m) == hidden:
            return m
    raise UserError(f"{path}: a SwiGLU hidden width of {hidden} is not DINOv2's 2/3 rule rounded up to "
                    f"a multiple of 8; dinox cannot build it")


def _mlp_from(get, prefix: str, layout: str) -> tuple[dict[str, torch.Tensor], bool, int]:
    """(dinox tensors of block ``prefix``'s MLP, swiglu, hidden width) from one of the layouts:
    "fc" (fc1/fc2), "w12" (w12/w3), "w123" (w1/w2/w3)."""
    if layout == "fc":
        w1, b1, w2, b2 = (get(f"{prefix}.fc1.weight"), get(f"{prefix}.fc1.bias"),
                          get(f"{prefix}.fc2.weight"), get(f"{prefix}.fc2.bias"))
        return {"mlp.fc1.weight": w1, "mlp.fc1.bias": b1, "mlp.fc2.weight": w2, "mlp.fc2.bias": b2}, False, w1.shape[0]
    if layout == "w12":
        w12, b12 = get(f"{prefix}.w12.weight"), get(f"{prefix}.w12.bias")
    else:
        w12 = torch.cat([get(f"{prefix}.w1.weight"), get(f"{prefix}.w2.weight")])
        b12 = torch.cat([get(f"{prefix}.w1.bias"), get(f"{prefix}.w2.bias")])
    w3, b3 = get(f"{prefix}.w3.weight"), get(f"{prefix}.w3.bias")
    return ({"mlp.w12.weight": w12, "mlp.w12.bias": b12, "mlp.w3.weight": w3, "mlp.w3.bias": b3},
            True, w3.shape[1])


def _mlp_layout(keys: _Keys, prefix: str) -> str:
    for layout, probe in (("fc", "fc1.weight"), ("w12", "w12.weight"), ("w123", "w1.weight")):
        if keys.has(f"{prefix}.{probe}"):
            return layout
    raise UserError(f"{keys.path}: no MLP weights under {prefix} (fc1/fc2, w12/w3 or w1/w2/w3)")


def _official(path: Path, state: dict[str, torch.Tensor], kind: str, heads: int | None,
              prefer_mlp: int | None) -> Imported:
    """A torch-hub DINOv2 or DINOv3 state dict -> dinox."""
    v3 = kind == DINOV3_HUB
    # DINOv2 training checkpoints chunk the blocks for FSDP: blocks.<chunk>.<i>.*
    state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k) if re.match(r"^blocks\.\d+\.\d+\.", k) else k: v
             for k, v in state.items()}
    keys = _Keys(state, path, "DINOv3" if v3 else "DINOv2")
    out: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    checked: list[str] = []
    notes: list[str] = []
    cls = keys.take("cls_token")
    dim = cls.shape[-1]
    proj = keys.take("patch_embed.proj.weight")
    out["patch_embed.weight"], out["patch_embed.bias"] = proj, keys.take("patch_embed.proj.bias")
    reg = keys.opt("storage_tokens" if v3 else "register_tokens")
    out["register_tokens"] = reg if reg is not None else cls.new_zeros(1, 0, dim)
    mask = keys.opt("mask_token")
    if mask is not None:
        extras["mask_token"] = mask.reshape(1, dim)
    grid, interp, rope_base = None, (0.0, False), 100.0
    if v3:
        periods = keys.take("rope_embed.periods").float()
        head_dim = 4 * periods.numel()
        if head_dim == 0 or dim % head_dim:
            raise UserError(f"{path}: rope_embed.periods of length {periods.numel()} fits no head width of dim {dim}")
        # periods[k] = base ** (4k / head_dim): periods[1] gives the base (DINOv3 rope_position_encoding.py)
        rope_base = float(periods[1]) ** (head_dim / 4) if periods.numel() > 1 else 100.0
        if abs(rope_base - round(rope_base)) < 1e-3 * rope_base:
            rope_base = float(round(rope_base))
        if not torch.allclose(periods, rope_periods(head_dim, rope_base), rtol=1e-3):
            raise UserError(f"{path}: rope_embed.periods do not follow base ** (2k / (head_dim / 2)) "
                            f"(min/max-period RoPE is not supported)")
        checked.append("rope_embed.periods")
        heads, heads_known = dim // head_dim, True
        out["cls_token"] = cls
        # untie_global_and_local_cls_norm (ViT-7B, ViT-L SAT-493M): a norm for the class
        # tokens of local crops, "never used during eval" (dinov3/models/vision_transformer.py)
        for n in ("weight", "bias"):
            t = keys.opt(f"local_cls_norm.{n}")
            if t is not None:
                extras[f"local_cls_norm.{n}"] = t
        if "local_cls_norm.weight" in extras:
            notes.append("local_cls_norm (training-only norm of local-crop class tokens) is not used")
    else:
        pos = keys.take("pos_embed")
        # the class token's position is folded into dinox's class token (see the module doc)
        extras["cls_token"], extras["cls_pos_embed"] = cls, pos[:, :1]
        out["cls_token"] = cls.float() + pos[:, :1].float()
        out["pos_embed"] = pos[:, 1:]
        grid = _grid_of(pos.shape[1] - 1, path)
        # dinov2/hub/backbones.py: _reg models antialias without offset, the others offset 0.1
        interp = (0.0, True) if reg is not None else (0.1, False)
        heads_known = False
        if heads is None:
            heads = max(dim // DEFAULT_HEAD_DIM, 1)
            notes.append(f"DINOv2 files do not record the head count: assumed {heads} "
                         f"(64-channel heads, as in every released DINOv2)")
        else:
            notes.append(f"DINOv2 files do not record the head count: {heads} from the requested architecture")
    depth = keys.count(r"^blocks\.(\d+)\.")
    if depth == 0:
        raise UserError(f"{path} has no transformer blocks (blocks.N.*): not a DINOv2/DINOv3 backbone")
    qkv_bias = keys.has("blocks.0.attn.qkv.bias")
    layerscale = keys.has("blocks.0.ls1.gamma")
    mask_k_bias = False
    swiglu, hidden = False, 0
    for i in range(depth):
        b = f"blocks.{i}"
        for n in ("norm1", "norm2"):
            out[f"{b}.{n}.weight"], out[f"{b}.{n}.bias"] = keys.take(f"{b}.{n}.weight"), keys.take(f"{b}.{n}.bias")
        out[f"{b}.attn.qkv.weight"] = keys.take(f"{b}.attn.qkv.weight")
        if qkv_bias:
            bias = keys.take(f"{b}.attn.qkv.bias")
            out[f"{b}.attn.qkv.bias"] = bias
            bias_mask = keys.opt(f"{b}.attn.qkv.bias_mask")
            if bias_mask is not None:
                expect = torch.ones(3 * dim)
                expect[dim:2 * dim] = 0
                if not torch.equal(bias_mask.float(), expect):
                    raise UserError(f"{path}: {b}.attn.qkv.bias_mask is not the key mask (1, 0, 1) of DINOv3")
                checked.append(f"{b}.attn.qkv.bias_mask")
                mask_k_bias = True
        out[f"{b}.attn.proj.weight"], out[f"{b}.attn.proj.bias"] = keys.take(f"{b}.attn.proj.weight"), keys.take(f"{b}.attn.proj.bias")
        if layerscale:
            out[f"{b}.ls1.gamma"], out[f"{b}.ls2.gamma"] = keys.take(f"{b}.ls1.gamma"), keys.take(f"{b}.ls2.gamma")
        mlp, swiglu, hidden = _mlp_from(keys.take, f"{b}.mlp", _mlp_layout(keys, f"{b}.mlp"))
        out.update({f"{b}.{k}": v for k, v in mlp.items()})
    out["norm.weight"], out["norm.bias"] = keys.take("norm.weight"), keys.take("norm.bias")
    keys.finish()
    arch = ViTArch(
        patch_size=proj.shape[-1], embed_dim=dim, depth=depth, num_heads=heads,
        mlp_hidden_dim=_gelu_width(hidden, prefer_mlp, dim, path) if swiglu else hidden, swiglu=swiglu,
        num_registers=out["register_tokens"].shape[1], layerscale_init=1e-5 if layerscale else None,
        qkv_bias=qkv_bias, rope=v3, rope_base=rope_base, mask_k_bias=mask_k_bias,
        ln_eps=1e-5 if v3 else 1e-6,  # DINOv3's "layernormbf16" and DINOv2's LayerNorm
    )
    if v3:
        notes.append("LayerNorm eps 1e-5 as in the released DINOv3 models (not recorded in the file)")
    return Imported(kind=kind, path=path, arch=arch, state=out, grid=grid,
                    img_size=grid[0] * arch.patch_size if grid else None, in_chans=proj.shape[1],
                    interp=interp, extras=extras, checked=checked, notes=notes, heads_known=heads_known)


def _hf_weight_names(folder: Path) -> list[str]:
    """The files that hold a transformers folder's model weights (not its heads or others)."""
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    if (folder / "model.safetensors.index.json").is_file():
        try:
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            return sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"{folder}/model.safetensors.index.json is not a shard index ({first_line(exc)})") from None
    if (folder / "pytorch_model.bin").is_file():
        return ["pytorch_model.bin"]
    raise UserError(f"{folder} has config.json but no weights ({', '.join(HF_WEIGHTS)})")


def _shapes(tensors: dict[str, torch.Tensor], shapes_only: bool) -> dict[str, torch.Tensor]:
    """With ``shapes_only`` the matrices become meta tensors (shape and dtype, no data read):
    what a plan needs to check a file against the requested architecture. Vectors stay (the
    RoPE periods, the key-bias mask and the LayerScale gammas are checked by value)."""
    if not shapes_only:
        return tensors
    return {k: v.to("meta") if v.ndim >= 2 else v for k, v in tensors.items()}


def _hf_tensors(folder: Path, shapes_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All weight tensors of a transformers folder and the sha256 of each file read (none
    with ``shapes_only``)."""
    files = {} if shapes_only else {"config.json": file_sha256(folder / "config.json")}
    tensors: dict[str, torch.Tensor] = {}
    for name in _hf_weight_names(folder):
        file = folder / name
        if not file.is_file() or Path(name).name != name:
            raise UserError(f"{folder}: weight file {name!r} is missing")
        if not shapes_only:
            files[name] = file_sha256(file)
        part = read_safetensors(file)[0] if name.endswith(".safetensors") else _tensor_dict(safe_torch_load(file), file)
        tensors.update(_shapes(part, shapes_only))
    return tensors, files


# transformers 5.x names (in memory) of the saved DINOv2 layout, in case a folder holds them
_HF_DINOV2_ALIASES = [
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.down_proj\.", ".mlp.weights_out."),
]


def _hf_normalise(tensors: dict[str, torch.Tensor], v3: bool) -> dict[str, torch.Tensor]:
    # a base model saved inside another (e.g. under "dinov2.") keeps its own names after the prefix
    for prefix in ("dinov2.", "dinov2_with_registers.", "model.", "backbone."):
        if any(k.startswith(prefix + "embeddings.") for k in tensors):
            tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
            break
    out = {}
    for key, value in tensors.items():
        if v3:
            key = re.sub(r"^model\.layer\.", "layer.", key)
        else:
            for pattern, repl in _HF_DINOV2_ALIASES:
                key = re.sub(pattern, repl, key)
        out[key] = value
    if not v3:  # gate_proj + up_proj -> the fused weights_in of the saved layout
        for key in [k for k in out if ".mlp.gate_proj." in k]:
            up = key.replace(".gate_proj.", ".up_proj.")
            if up in out:
                out[key.replace(".gate_proj.", ".weights_in.")] = torch.cat([out.pop(key), out.pop(up)])
    return out


def _hf(folder: Path, kind: str, heads_hint: int | None, prefer_mlp: int | None,
        shapes_only: bool = False) -> Imported:
    """A transformers Dinov2Model / Dinov2WithRegistersModel / DINOv3ViTModel folder -> dinox."""
    config = _read_config(folder)
    raw, files = _hf_tensors(folder, shapes_only)
    v3 = kind == HF_DINOV3
    keys = _Keys(_hf_normalise(raw, v3), folder, HF_CLASSES[kind])
    where = folder / "config.json"
    dim = int(config["hidden_size"]) if "hidden_size" in config else None
    depth = int(config.get("num_hidden_layers", 0))
    heads = int(config.get("num_attention_heads", 0))
    if not dim or not depth or not heads:
        raise UserError(f"{where} lacks hidden_size / num_hidden_layers / num_attention_heads")
    patch = config.get("patch_size", 16 if v3 else 14)
    image = config.get("image_size", 224)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise UserError(f"{where}: non-square patch_size {patch} is not supported")
        patch = patch[0]
    if isinstance(image, (list, tuple)):
        image = image[0]
    patch, image = int(patch), int(image)
    eps = float(config.get("layer_norm_eps") or (1e-5 if v3 else 1e-6))
    act = config.get("hidden_act", "gelu")
    out: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    e = "embeddings."
    cls = keys.take(e + "cls_token")
    mask = keys.opt(e + "mask_token")
    if mask is not None:
        extras["mask_token"] = mask.reshape(1, dim)
    reg = keys.opt(e + "register_tokens")
    out["register_tokens"] = reg if reg is not None else cls.new_zeros(1, 0, dim)
    grid, interp = None, (0.0, False)
    if v3:
        out["patch_embed.weight"], out["patch_embed.bias"] = keys.take(e + "patch_embeddings.weight"), keys.take(e + "patch_embeddings.bias")
        out["cls_token"] = cls
        qb, kb, vb = (bool(config.get(n, d)) for n, d in (("query_bias", True), ("key_bias", False), ("value_bias", True)))
        if qb != vb or (kb and not qb):
            raise UserError(f"{where}: query_bias {qb}, key_bias {kb}, value_bias {vb}; dinox's fused qkv "
                            f"has a bias on all three or none")
        for flag in ("proj_bias", "mlp_bias"):
            if not config.get(flag, True):
                raise UserError(f"{where}: {flag} false; dinox's projections always have a bias")
        qkv_bias, mask_k_bias = qb, qb and not kb
        gated = bool(config.get("use_gated_mlp", False))
        if act != ("silu" if gated else "gelu"):
            raise UserError(f"{where}: hidden_act {act!r} with use_gated_mlp {gated}; dinox has exact GELU "
                            f"or SwiGLU (silu gate)")
        for aug in ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale"):
            if config.get(aug) is not None:
                notes.append(f"{aug}={config[aug]} is a training-time RoPE augmentation; dinox does not apply it")
        layer, attn, names = "layer.{i}.", "attention.", ("q_proj", "k_proj", "v_proj")
        out_proj, norm = "attention.o_proj", "norm"
    else:
        out["patch_embed.weight"] = keys.take(e + "patch_embeddings.projection.weight")
        out["patch_embed.bias"] = keys.take(e + "patch_embeddings.projection.bias")
        pos = keys.take(e + "position_embeddings")
        extras["cls_token"], extras["cls_pos_embed"] = cls, pos[:, :1]
        out["cls_token"] = cls.float() + pos[:, :1].float()
        out["pos_embed"] = pos[:, 1:]
        grid = _grid_of(pos.shape[1] - 1, folder)
        if grid[0] != image // patch:
            raise UserError(f"{where}: image_size {image} / patch_size {patch} does not match the "
                            f"{grid[0]}x{grid[1]} position embeddings")
        # transformers: Dinov2WithRegisters resamples with antialias, Dinov2 without
        interp = (0.0, kind == HF_DINOV2_REG)
        qkv_bias, mask_k_bias = bool(config.get("qkv_bias", True)), False
        gated = bool(config.get("use_swiglu_ffn", False))
        if not gated and act != "gelu":
            raise UserError(f"{where}: hidden_act {act!r}; dinox's MLP uses exact GELU ('gelu')")
        layer, attn, names = "encoder.layer.{i}.", "attention.attention.", ("query", "key", "value")
        out_proj, norm = "attention.output.dense", "layernorm"
    found = keys.count(r"^(?:encoder\.)?layer\.(\d+)\.")
    if found != depth:
        raise UserError(f"{where}: num_hidden_layers {depth} but the weights hold {found} layers")
    hidden = 0
    for i in range(depth):
        src, b = layer.format(i=i), f"blocks.{i}."
        for n in ("norm1", "norm2"):
            out[b + n + ".weight"], out[b + n + ".bias"] = keys.take(src + n + ".weight"), keys.take(src + n + ".bias")
        ws = [keys.take(f"{src}{attn}{n}.weight") for n in names]
        out[b + "attn.qkv.weight"] = torch.cat(ws)
        if qkv_bias:
            q, v = (keys.take(f"{src}{attn}{n}.bias") for n in (names[0], names[2]))
            k_name = f"{src}{attn}{names[1]}.bias"
            if mask_k_bias:  # DINOv3 in transformers has no key bias: dinox's is masked to zero
                if keys.has(k_name):
                    raise UserError(f"{where}: key_bias is false but {k_name} exists")
                k = torch.zeros_like(q)
            else:
                k = keys.take(k_name)
            out[b + "attn.qkv.bias"] = torch.cat([q, k, v])
        out[b + "attn.proj.weight"], out[b + "attn.proj.bias"] = keys.take(src + out_proj + ".weight"), keys.take(src + out_proj + ".bias")
        out[b + "ls1.gamma"], out[b + "ls2.gamma"] = keys.take(src + "layer_scale1.lambda1"), keys.take(src + "layer_scale2.lambda1")
        m = src + "mlp."
        if v3 and gated:
            w12 = torch.cat([keys.take(m + "gate_proj.weight"), keys.take(m + "up_proj.weight")])
            b12 = torch.cat([keys.take(m + "gate_proj.bias"), keys.take(m + "up_proj.bias")])
            w3, b3 = keys.take(m + "down_proj.weight"), keys.take(m + "down_proj.bias")
        elif v3:
            w1, b1 = keys.take(m + "up_proj.weight"), keys.take(m + "up_proj.bias")
            w3, b3 = keys.take(m + "down_proj.weight"), keys.take(m + "down_proj.bias")
        elif gated:
            w12, b12 = keys.take(m + "weights_in.weight"), keys.take(m + "weights_in.bias")
            w3, b3 = keys.take(m + "weights_out.weight"), keys.take(m + "weights_out.bias")
        else:
            w1, b1 = keys.take(m + "fc1.weight"), keys.take(m + "fc1.bias")
            w3, b3 = keys.take(m + "fc2.weight"), keys.take(m + "fc2.bias")
        if gated:
            out.update({b + "mlp.w12.weight": w12, b + "mlp.w12.bias": b12, b + "mlp.w3.weight": w3, b + "mlp.w3.bias": b3})
        else:
            out.update({b + "mlp.fc1.weight": w1, b + "mlp.fc1.bias": b1, b + "mlp.fc2.weight": w3, b + "mlp.fc2.bias": b3})
        hidden = w3.shape[1]
    out["norm.weight"], out["norm.bias"] = keys.take(norm + ".weight"), keys.take(norm + ".bias")
    keys.finish()
    if v3:
        declared = int(config.get("intermediate_size", hidden))
    else:
        declared = int(dim * float(config.get("mlp_ratio", 4)))
        declared = swiglu_hidden_dim(declared) if gated else declared
    if declared != hidden:
        raise UserError(f"{where} declares an MLP width of {declared} but the weights have {hidden}")
    arch = ViTArch(
        patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_hidden_dim=_gelu_width(hidden, prefer_mlp, dim, folder) if gated else hidden, swiglu=gated,
        num_registers=out["register_tokens"].shape[1], layerscale_init=1e-5, qkv_bias=qkv_bias,
        rope=v3, rope_base=float(config.get("rope_theta", 100.0)) if v3 else 100.0,
        mask_k_bias=mask_k_bias, ln_eps=eps,
    )
    in_chans = out["patch_embed.weight"].shape[1]
    return Imported(kind=kind, path=folder, arch=arch, state=out, grid=grid,
                    img_size=grid[0] * patch if grid else image, in_chans=in_chans, interp=interp,
                    extras=extras, notes=notes, files=files)


def _dinox_safetensors(path: Path, shapes_only: bool = False) -> Imported:
    tensors, meta = read_safetensors(path)
    tensors = _shapes(tensors, shapes_only)
    try:
        arch_dict = json.loads(meta["arch"])
        img_size, in_chans = int(meta["img_size"]), int(meta.get("in_chans", 3))
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: dinox metadata unreadable ({first_line(exc)})") from None
    arch = _arch_from_dict(arch_dict, path)
    grid = None if arch.rope else (img_size // arch.patch_size,) * 2
    extras = {k[len("extra."):]: tensors.pop(k) for k in [k for k in tensors if k.startswith("extra.")]}
    return Imported(kind=DINOX_SAFETENSORS, path=path, arch=arch, state=tensors, grid=grid,
                    img_size=img_size, in_chans=in_chans, extras=extras)


def read_weights(path: str | os.PathLike, *, heads: int | None = None,
                 prefer_mlp: int | None = None, shapes_only: bool = False) -> Imported:
    """Read backbone weights from any supported source (see the module doc). A non-finite
    or implausibly large value is refused with the tensor named, as in a training
    checkpoint: such weights load without complaint and give NaN features.

    ``heads`` fills in the head count where the file does not record it (DINOv2 files);
    ``prefer_mlp`` picks the GELU-equivalent width that names a SwiGLU width (several do).
    ``shapes_only`` (a plan): the architecture without reading the matrices' data, so no
    sha256, only the vectors' values checked, and meta tensors in ``state``: it cannot be loaded."""
    src = _read_source(Path(path), heads, prefer_mlp, shapes_only)
    if _written_by_dinox(Path(path)):   # its positions resample as the checkpoint's, at any grid
        src = dataclasses.replace(src, interp=(0.0, False))
    problem = content_problem({k: v for k, v in src.state.items() if not v.is_meta})
    if problem:
        raise UserError(f"{src.path} holds unusable weights: {problem}; use an intact copy of the weights")
    return src


def _read_source(path: Path, heads: int | None, prefer_mlp: int | None, shapes_only: bool = False) -> Imported:
    kind = detect_source(path)
    if path.is_dir() and kind in (DINOV2_HUB, DINOV3_HUB):
        path = _dinox_hub_in(path)  # a dinox export folder of an official layout: its .pth
    if kind == DINOX_CHECKPOINT:
        raise UserError(f"{path} is a dinox training checkpoint: resume it with --resume, read it with "
                        f"dinox.load_backbone, or export its backbone with dinox export --format safetensors")
    if kind in HF_CLASSES.keys():
        folder = path if path.is_dir() else path.parent
        return _hf(folder, kind, heads, prefer_mlp, shapes_only)
    if kind == DINOX_SAFETENSORS:
        file = path if path.is_file() else _dinox_safetensors_in(path)
        src = _dinox_safetensors(file, shapes_only)
        src.files = {} if shapes_only else {file.name: file_sha256(file)}
        return src
    state = _shapes(_tensor_dict(safe_torch_load(path), path, announce=True), shapes_only)
    sidecar = _hub_sidecar(path)
    if sidecar is not None:  # written by dinox export: what the key layout cannot say
        heads, prefer_mlp = sidecar.num_heads, sidecar.mlp_dim
    src = _official(path, state, kind, heads, prefer_mlp)
    if sidecar is not None:
        inferred = dataclasses.replace(src.arch, ln_eps=sidecar.ln_eps)
        if sidecar.layerscale_init is None and _layerscale_is_identity(src):
            inferred = dataclasses.replace(inferred, layerscale_init=None)  # written as ones
        if _signature(inferred) != _signature(sidecar):
            raise UserError(f"{path} does not match the architecture in {path.with_suffix('.json').name}: "
                            f"[{describe(inferred)}] vs [{describe(sidecar)}]")
        src.arch, src.heads_known = sidecar, True
        src.notes = [n for n in src.notes if "not record" not in n]
    elif not src.heads_known and heads is None:
        log.warning("%s: %s", path, src.notes[-1])
    src.files = {} if shapes_only else {path.name: file_sha256(path)}
    return src


def hub_sidecar(backbone: VisionTransformer) -> dict:
    """``<name>.json`` beside a torch-hub layout file that dinox wrote: the architecture
    fields that DINOv2/DINOv3 key layouts do not record (heads, LayerNorm eps)."""
    return {"format_dinox": DINOX_BACKBONE_FORMAT, "arch": dataclasses.asdict(backbone.arch),
            "img_size": backbone.img_size, "in_chans": backbone.in_chans}


def _hub_sidecar(path: Path) -> ViTArch | None:
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format_dinox") != DINOX_BACKBONE_FORMAT:
        return None
    return _arch_from_dict(data.get("arch"), side)


def _arch_from_dict(arch_dict, where: Path) -> ViTArch:
    fields = {f.name for f in dataclasses.fields(ViTArch)}
    if not isinstance(arch_dict, dict):
        raise UserError(f"{where}: no architecture record")
    unknown = set(arch_dict) - fields
    if unknown:
        raise UserError(f"{where} was written by a newer dinox (architecture fields {sorted(unknown)}); "
                        f"update dinox to read it")
    try:
        return ViTArch(**arch_dict)
    except TypeError as exc:
        raise UserError(f"{where}: architecture record unreadable ({first_line(exc)})") from None


# ----------------------------------------------------------------------------- loading

@dataclass
class ImportReport:
    """What ``load_pretrained`` did; ``as_dict()`` is JSON-safe (for provenance)."""

    source: Imported
    position: str

    def as_dict(self) -> dict:
        s = self.source
        return {
            "path": str(s.path), "kind": s.kind, "sha256": s.sha256, "files": dict(s.files),
            "arch": describe(s.arch), "tensors": len(s.state), "position_embedding": self.position,
            "checked": list(s.checked), "not_used": sorted(s.extras), "notes": list(s.notes),
        }


def apply_weights(src: Imported, backbone: VisionTransformer) -> ImportReport:
    """Load ``src`` into ``backbone`` after checking shapes; nothing is loaded on an error."""
    target = backbone.arch
    check_arch(src, target)
    check_channels(src, backbone.in_chans)
    state = dict(src.state)
    has_ls = any(k.endswith(".ls1.gamma") for k in state)
    if has_ls and target.layerscale_init is None:
        state = {k: v for k, v in state.items() if not k.endswith((".ls1.gamma", ".ls2.gamma"))}
    elif not has_ls and target.layerscale_init is not None:
        for i in range(target.depth):  # no LayerScale == a LayerScale of ones, exactly
            for n in ("ls1", "ls2"):
                state[f"blocks.{i}.{n}.gamma"] = torch.ones(target.embed_dim)
    position = "RoPE (no learned positions)"
    if not target.rope:
        new = (backbone.grid_size, backbone.grid_size)
        if src.grid != new:
            offset, antialias = src.interp
            state["pos_embed"] = resample_token_grid(state["pos_embed"], src.grid, new, offset=offset,
                                                     antialias=antialias)
            position = (f"resampled {src.grid[0]}x{src.grid[1]} -> {new[0]}x{new[1]} (bicubic"
                        f"{', antialiased' if antialias else ''}{f', offset {offset:g}' if offset else ''},"
                        f" the source's convention)")
        else:
            position = f"native {new[0]}x{new[1]} grid"
    expected = backbone.state_dict()
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    missing, unused = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if wrong or missing or unused:
        raise UserError(f"{src.path} does not fit the backbone: "
                        + "; ".join(filter(None, [f"shapes {', '.join(wrong[:3])}" if wrong else "",
                                                  f"missing {', '.join(missing[:3])}" if missing else "",
                                                  f"unused {', '.join(unused[:3])}" if unused else ""])))
    with torch.no_grad():
        backbone.load_state_dict(state, strict=True)
    return ImportReport(source=src, position=position)


def load_pretrained(path: str | os.PathLike, backbone: VisionTransformer) -> ImportReport:
    """Load the backbone weights at ``path`` into ``backbone`` (heads untouched): the
    architecture must match, every source tensor is used or checked, position embeddings
    are resampled to the backbone's grid with the source's convention."""
    src = read_weights(path, heads=backbone.arch.num_heads, prefer_mlp=backbone.arch.mlp_dim)
    return apply_weights(src, backbone)


def check_channels(src: Imported, in_chans: int) -> None:
    if src.in_chans != in_chans:
        raise UserError(f"{src.path} embeds {src.in_chans}-channel images, the backbone takes {in_chans}")


def check_init_source(path: str | os.PathLike, arch: ViTArch, in_chans: int = 3) -> Imported:
    """What ``--init-from`` would load, read and checked against ``arch`` and the input's
    channels (the trainer's 2.5D stacks: 3) without building a backbone (a dry run plans for
    a machine that may not hold one): UserError for a file that is missing, of an unknown
    kind, or of another shape. Only the shapes are read (a plan must not need the memory or
    the time that reading a ViT-g's gigabytes takes); training reads and checks the values."""
    src = read_weights(path, heads=arch.num_heads, prefer_mlp=arch.mlp_dim, shapes_only=True)
    check_arch(src, arch)
    check_channels(src, in_chans)
    return src


def init_backbone_from(path: str | os.PathLike, backbone: VisionTransformer) -> dict:
    """The trainer's ``--init-from``: load released / exported weights into ``backbone`` (the
    student's; copy it to the teacher afterwards) and return the JSON-safe report for the
    run's provenance: source path, kind, sha256 (of the file, or of the folder's files),
    architecture, how the position embedding was adapted, checked buffers, unused tensors."""
    return load_pretrained(path, backbone).as_dict()


def load_exported(path: str | os.PathLike, device: torch.device | str = "cpu") -> VisionTransformer:
    """A backbone (eval mode) built from the architecture recorded with weights that are
    not a dinox checkpoint: a transformers / dinox export folder, a dinox safetensors file,
    a torch-hub DINOv2 / DINOv3 file. It resamples positions for new grids the way its source
    does."""
    src = read_weights(path)
    img = src.img_size or 224
    backbone = VisionTransformer(src.arch, img_size=img, in_chans=src.in_chans)
    apply_weights(src, backbone)
    backbone.pos_interp_offset, backbone.pos_interp_antialias = src.interp   # dinox's own: (0, False)
    return backbone.to(device).eval()


def _written_by_dinox(path: Path) -> bool:
    """An export `dinox export` wrote (its folder holds PREPROCESSING_FILE, or a hub file its
    sidecar): its features must equal the checkpoint's at every input size, so its positions
    are resampled as dinox resamples them, not as the layout's home library does."""
    folder = path if path.is_dir() else path.parent
    return (folder / PREPROCESSING_FILE).is_file() or (path.is_file() and _hub_sidecar(path) is not None)


# ----------------------------------------------------------------------------- export layouts

def _backbone_state(backbone: VisionTransformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}


def _cls_and_position(sd: dict, extras: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(class token, class position) of the layouts that keep them apart: the imported
    originals while the folded sum is unchanged (exact round trip), else (dinox's, zero)."""
    cls = sd["cls_token"]
    extras = extras or {}
    a, b = extras.get("cls_token"), extras.get("cls_pos_embed")
    if a is not None and b is not None and a.shape == cls.shape and b.shape == cls.shape \
            and torch.equal(a.float() + b.float(), cls.float()):
        return a, b
    return cls, torch.zeros_like(cls)


def _mask_token(sd: dict, extras: dict | None, shape: tuple[int, ...]) -> torch.Tensor:
    """The imported mask token, or DINOv2's initial value (zeros): dinox trains none."""
    mask = (extras or {}).get("mask_token")
    if mask is not None and mask.numel() == math.prod(shape):
        return mask.reshape(shape)
    return torch.zeros(shape, dtype=sd["cls_token"].dtype)


def _gammas(sd: dict, arch: ViTArch, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if arch.layerscale_init is not None:
        return sd[f"blocks.{i}.ls1.gamma"], sd[f"blocks.{i}.ls2.gamma"]
    ones = torch.ones(arch.embed_dim)
    return ones, ones.clone()


def _qkv_parts(sd: dict, arch: ViTArch, i: int):
    d = arch.embed_dim
    w = sd[f"blocks.{i}.attn.qkv.weight"]
    b = sd.get(f"blocks.{i}.attn.qkv.bias")
    ws = (w[:d], w[d:2 * d], w[2 * d:])
    bs = (b[:d], torch.zeros_like(b[d:2 * d]) if arch.mask_k_bias else b[d:2 * d], b[2 * d:]) if b is not None else None
    return ws, bs


def _mlp_ratio(dim: int, width: int) -> int:
    """transformers' Dinov2 mlp_ratio for an MLP `width` at `dim` (it derives the width as
    int(dim * mlp_ratio)). transformers 5 takes only a whole number (its config refuses 4.36),
    so a width that is no whole multiple of dim, e.g. vit-giant's 6144 at 1408 (ViT-g/14 of
    DINOv2's paper), has no Dinov2 config: refused, with the formats that hold it."""
    if width % dim == 0:
        return width // dim
    raise UserError(f"an MLP width of {width} at width {dim} ({width / dim:.3g}x) has no transformers Dinov2 "
                    f"config: its mlp_ratio takes whole numbers only (transformers 5 refuses {width / dim:.3g}); "
                    f"export --format safetensors (dinox's own, dinox.model.weights.load_exported) or "
                    f"--format dinov2-hub (the official torch-hub layout) instead")


def hf_class(arch: ViTArch) -> str:
    """The transformers model class with the same function as a dinox backbone."""
    return "DINOv3ViTModel" if arch.rope else ("Dinov2WithRegistersModel" if arch.num_registers else "Dinov2Model")


def hf_config(arch: ViTArch, img_size: int, in_chans: int = 3) -> dict:
    """config.json of the transformers model with the same function as a dinox backbone:
    DINOv3ViTModel for RoPE, else Dinov2WithRegistersModel (Dinov2Model without registers)."""
    common = {
        "hidden_size": arch.embed_dim, "num_hidden_layers": arch.depth,
        "num_attention_heads": arch.num_heads, "layer_norm_eps": arch.ln_eps,
        "image_size": img_size, "patch_size": arch.patch_size, "num_channels": in_chans,
        "layerscale_value": arch.layerscale_init if arch.layerscale_init is not None else 1.0,
        "drop_path_rate": 0.0, "initializer_range": 0.02,
    }
    if arch.rope:
        return {
            "architectures": [hf_class(arch)], "model_type": "dinov3_vit", **common,
            "intermediate_size": _ffn_hidden(arch), "use_gated_mlp": arch.swiglu,
            "hidden_act": "silu" if arch.swiglu else "gelu", "rope_theta": arch.rope_base,
            "query_bias": arch.qkv_bias, "key_bias": arch.qkv_bias and not arch.mask_k_bias,
            "value_bias": arch.qkv_bias, "proj_bias": True, "mlp_bias": True,
            "num_register_tokens": arch.num_registers, "attention_dropout": 0.0,
            # dinox trains without DINOv3's RoPE coordinate augmentation
            "pos_embed_shift": None, "pos_embed_jitter": None, "pos_embed_rescale": None,
        }
    registers = arch.num_registers > 0
    config = {
        "architectures": [hf_class(arch)],
        "model_type": "dinov2_with_registers" if registers else "dinov2", **common,
        "mlp_ratio": _mlp_ratio(arch.embed_dim, arch.mlp_dim), "hidden_act": "gelu",
        "use_swiglu_ffn": arch.swiglu, "qkv_bias": arch.qkv_bias,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }
    if registers:
        config["num_register_tokens"] = arch.num_registers
    else:
        config["use_mask_token"] = True
    return config


def hf_state(backbone: VisionTransformer, extras: dict | None = None) -> dict[str, torch.Tensor]:
    """The backbone's tensors in the layout transformers' save_pretrained writes (and every
    transformers version >= 4.56 loads) for the model of ``hf_config``."""
    arch, sd = backbone.arch, _backbone_state(backbone)
    d = arch.embed_dim
    out: dict[str, torch.Tensor] = {}
    e = "embeddings."
    if arch.rope:
        out[e + "cls_token"] = sd["cls_token"]
        out[e + "mask_token"] = _mask_token(sd, extras, (1, 1, d))
        out[e + "register_tokens"] = sd["register_tokens"]
        out[e + "patch_embeddings.weight"], out[e + "patch_embeddings.bias"] = sd["patch_embed.weight"], sd["patch_embed.bias"]
        layer, attn, names, out_proj, norm = "layer.{i}.", "attention.", ("q_proj", "k_proj", "v_proj"), "attention.o_proj", "norm"
    else:
        cls, pos0 = _cls_and_position(sd, extras)
        out[e + "cls_token"] = cls
        out[e + "mask_token"] = _mask_token(sd, extras, (1, d))
        out[e + "position_embeddings"] = torch.cat([pos0.to(sd["pos_embed"].dtype), sd["pos_embed"]], dim=1)
        if arch.num_registers:
            out[e + "register_tokens"] = sd["register_tokens"]
        out[e + "patch_embeddings.projection.weight"] = sd["patch_embed.weight"]
        out[e + "patch_embeddings.projection.bias"] = sd["patch_embed.bias"]
        layer, attn, names = "encoder.layer.{i}.", "attention.attention.", ("query", "key", "value")
        out_proj, norm = "attention.output.dense", "layernorm"
    for i in range(arch.depth):
        src, dst = f"blocks.{i}.", layer.format(i=i)
        for n in ("norm1", "norm2"):
            out[dst + n + ".weight"], out[dst + n + ".bias"] = sd[src + n + ".weight"], sd[src + n + ".bias"]
        ws, bs = _qkv_parts(sd, arch, i)
        for j, n in enumerate(names):
            out[f"{dst}{attn}{n}.weight"] = ws[j].clone()
            if bs is not None and not (arch.rope and j == 1 and arch.mask_k_bias):
                out[f"{dst}{attn}{n}.bias"] = bs[j].clone()
        out[dst + out_proj + ".weight"], out[dst + out_proj + ".bias"] = sd[src + "attn.proj.weight"], sd[src + "attn.proj.bias"]
        out[dst + "layer_scale1.lambda1"], out[dst + "layer_scale2.lambda1"] = _gammas(sd, arch, i)
        m = dst + "mlp."
        if arch.swiglu:
            w12, b12 = sd[src + "mlp.w12.weight"], sd[src + "mlp.w12.bias"]
            if arch.rope:
                h = w12.shape[0] // 2
                out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = w12[:h].clone(), w12[h:].clone()
                out[m + "gate_proj.bias"], out[m + "up_proj.bias"] = b12[:h].clone(), b12[h:].clone()
                out[m + "down_proj.weight"], out[m + "down_proj.bias"] = sd[src + "mlp.w3.weight"], sd[src + "mlp.w3.bias"]
            else:
                out[m + "weights_in.weight"], out[m + "weights_in.bias"] = w12, b12
                out[m + "weights_out.weight"], out[m + "weights_out.bias"] = sd[src + "mlp.w3.weight"], sd[src + "mlp.w3.bias"]
        else:
            up, down = ("up_proj", "down_proj") if arch.rope else ("fc1", "fc2")
            out[m + up + ".weight"], out[m + up + ".bias"] = sd[src + "mlp.fc1.weight"], sd[src + "mlp.fc1.bias"]
            out[m + down + ".weight"], out[m + down + ".bias"] = sd[src + "mlp.fc2.weight"], sd[src + "mlp.fc2.bias"]
    out[norm + ".weight"], out[norm + ".bias"] = sd["norm.weight"], sd["norm.bias"]
    return out


def _official_blocks(sd: dict, arch: ViTArch, out: dict, v3: bool) -> None:
    d = arch.embed_dim
    for i in range(arch.depth):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            out[b + n + ".weight"], out[b + n + ".bias"] = sd[b + n + ".weight"], sd[b + n + ".bias"]
        out[b + "attn.qkv.weight"] = sd[b + "attn.qkv.weight"]
        if arch.qkv_bias:
            bias = sd[b + "attn.qkv.bias"]
            if arch.mask_k_bias and v3:
                out[b + "attn.qkv.bias"] = bias  # kept as is: the mask below zeroes its key part
                mask = torch.ones(3 * d, dtype=bias.dtype)
                mask[d:2 * d] = 0
                out[b + "attn.qkv.bias_mask"] = mask
            elif arch.mask_k_bias:
                out[b + "attn.qkv.bias"] = torch.cat([bias[:d], torch.zeros_like(bias[d:2 * d]), bias[2 * d:]])
            else:
                out[b + "attn.qkv.bias"] = bias
        out[b + "attn.proj.weight"], out[b + "attn.proj.bias"] = sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"]
        out[b + "ls1.gamma"], out[b + "ls2.gamma"] = _gammas(sd, arch, i)
        if arch.swiglu:
            w12, b12 = sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"]
            if v3:
                h = w12.shape[0] // 2
                out[b + "mlp.w1.weight"], out[b + "mlp.w2.weight"] = w12[:h].clone(), w12[h:].clone()
                out[b + "mlp.w1.bias"], out[b + "mlp.w2.bias"] = b12[:h].clone(), b12[h:].clone()
            else:
                out[b + "mlp.w12.weight"], out[b + "mlp.w12.bias"] = w12, b12
            out[b + "mlp.w3.weight"], out[b + "mlp.w3.bias"] = sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"]
        else:
            for n in ("fc1", "fc2"):
                out[b + f"mlp.{n}.weight"], out[b + f"mlp.{n}.bias"] = sd[b + f"mlp.{n}.weight"], sd[b + f"mlp.{n}.bias"]
    out["norm.weight"], out["norm.bias"] = sd["norm.weight"], sd["norm.bias"]


def dinov2_hub_state(backbone: VisionTransformer, extras: dict | None = None) -> dict[str, torch.Tensor]:
    """The backbone in the torch-hub DINOv2 key layout (dinov2/models/vision_transformer.py):
    ``DinoVisionTransformer(..., num_register_tokens=R, init_values=1.0).load_state_dict``
    takes it strictly. LayerScale is written as ones when the backbone has none."""
    arch, sd = backbone.arch, _backbone_state(backbone)
    if arch.rope:
        raise UserError("this backbone uses RoPE (DINOv3 layout), which DINOv2 does not have; "
                        "export it with --format dinov3-hub or --format hf")
    cls, pos0 = _cls_and_position(sd, extras)
    out = {"cls_token": cls, "pos_embed": torch.cat([pos0.to(sd["pos_embed"].dtype), sd["pos_embed"]], dim=1)}
    if arch.num_registers:
        out["register_tokens"] = sd["register_tokens"]
    out["mask_token"] = _mask_token(sd, extras, (1, arch.embed_dim))
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = sd["patch_embed.weight"], sd["patch_embed.bias"]
    _official_blocks(sd, arch, out, v3=False)
    return out


def dinov3_hub_state(backbone: VisionTransformer, extras: dict | None = None) -> dict[str, torch.Tensor]:
    """The backbone in the DINOv3 key layout (dinov3/models/vision_transformer.py), every
    block with its LayerScale gammas (ones where the network has none) and a key-bias mask
    where it has one; the constructor call that loads it strictly is on the export's card
    (`dinox.commands.export`)."""
    arch, sd = backbone.arch, _backbone_state(backbone)
    if not arch.rope:
        raise UserError("this backbone learns absolute position embeddings (DINOv2 layout), which "
                        "DINOv3 does not have; export it with --format dinov2-hub or --format hf")
    out = {"cls_token": sd["cls_token"]}
    if arch.num_registers:
        out["storage_tokens"] = sd["register_tokens"]
    out["mask_token"] = _mask_token(sd, extras, (1, arch.embed_dim))
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = sd["patch_embed.weight"], sd["patch_embed.bias"]
    out["rope_embed.periods"] = rope_periods(arch.head_dim, arch.rope_base)
    _official_blocks(sd, arch, out, v3=True)
    out.update({k: v for k, v in (extras or {}).items() if k.startswith("local_cls_norm.")})
    return out


def dinox_safetensors_metadata(backbone: VisionTransformer, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"format": "pt", "format_dinox": DINOX_BACKBONE_FORMAT,
            "arch": json.dumps(dataclasses.asdict(backbone.arch)),
            "img_size": str(backbone.img_size), "in_chans": str(backbone.in_chans), **(extra or {})}


def write_backbone_safetensors(path: str | os.PathLike, backbone: VisionTransformer,
                               extras: dict | None = None, metadata: dict[str, str] | None = None) -> Path:
    """dinox's own state dict as safetensors, the architecture in its metadata (what
    ``load_exported`` / ``dinox.load_backbone`` read back); ``extras`` ride along as
    ``extra.<name>`` so that a later export can still reproduce the imported tensors."""
    tensors = _backbone_state(backbone)
    tensors.update({f"extra.{k}": v for k, v in (extras or {}).items()})
    return write_safetensors(path, tensors, dinox_safetensors_metadata(backbone, metadata))


def write_hf_folder(out: str | os.PathLike, backbone: VisionTransformer,
                    extras: dict | None = None) -> list[Path]:
    """config.json + model.safetensors that ``transformers.AutoModel.from_pretrained(out)``
    loads strictly; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(backbone.arch, backbone.img_size, backbone.in_chans)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model = write_safetensors(out / "model.safetensors", hf_state(backbone, extras), {"format": "pt"})
    return [out / "config.json", model]
