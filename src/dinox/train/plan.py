"""Peak training memory of one DINO step, estimated from the architecture before allocating.

The requirement "Custom configuration via CLI arguments" asks that a model be checked
against the device's memory before training; this module does it from arithmetic alone
(no model is built), so a ViT-Giant can be refused on a 24 GB card in milliseconds.

What is counted (bytes; P = student backbone + head parameters):
- weights: student and EMA teacher (backbone + head) and the frozen Gram teacher
  (backbone only), all fp32.
- gradients: fp32 for the student (kept across accumulation micro-batches).
- optimizer: AdamW's two fp32 moments for the student.
- activations: what the student's forward saves for backward, for every view, plus
  what backward needs while it runs (below).
- teacher_transient: the largest live set of a no-grad teacher forward; it runs before
  the student's forward, so the peak holds the larger of it and the student's share.
- head_logits: DINO head activations, student and teacher logits with the fp32 softmax
  work of the loss, the Gram teacher's patch tokens and the Gram matrices.
- overhead: 10 % of the rest for caching-allocator fragmentation and cuBLAS/cuDNN
  workspaces, plus a fixed 0.75 GiB for the CUDA/HIP context.

Activation accounting follows Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models" (arXiv:2205.05198), section 4.1: a transformer layer saves
s*b*h*(34 + 5*a*s/h) bytes in 16-bit, s tokens, b batch, h width, a heads. With SDPA's
flash / memory-efficient kernels the 5*a*s/h term (the s x s attention matrices) is not
stored (only a per-head log-sum-exp), ViT blocks have no dropout masks, and the MLP width
is a parameter, so per token and block this module counts, for a pre-norm block with
LayerScale as in DINOv2:
- 2 LayerNorm inputs on the residual stream, kept fp32 even under autocast because the
  fp32 LayerScale and position embedding promote the residual to fp32: 2 x 4 x h bytes;
- 8 x h elements in the compute dtype: qkv input (h), qkv output holding q, k, v (3h),
  attention output = proj input (h, the flash output layout makes the reshape a view),
  proj output kept by LayerScale (h), fc1 input (h), fc2 output kept by LayerScale (h);
- 2 x m elements for a GELU MLP of width m (fc1 output, GELU output), 4 x m for SwiGLU
  (the fused w12 output 2m, SiLU output, gated product);
- the per-head fp32 log-sum-exp and LayerNorm mean/rstd (4 x a + 16 bytes).
Those coefficients match, byte for byte, the tensors autograd saves for such a block
(tests/test_memory.py measures them with saved_tensors_hooks, on CPU with bf16 autocast
and the CPU flash SDPA kernel; the CUDA/ROCm kernels save the same q, k, v, out, lse).
Where SDPA falls back to its math kernel (no flash/efficient kernel for the GPU) each
block additionally keeps a x s x s attention probabilities, which this does not count.
Under autocast the bf16 copies of the student's weights are saved as well (2 bytes x P).

With gradient checkpointing (torch.utils.checkpoint per block) only each block's fp32
input is kept, plus one block's full activations while it is recomputed. Either way
backward holds gradient buffers of about one block's activations at a time.

Sharded with FSDP2 over W ranks (`shard_world`), each rank keeps 1/W of the weights,
gradients and AdamW moments; on top of that it holds, while a unit runs, the unit's whole
parameters (and during backward its whole gradients before they are reduce-scattered),
two units at a time with FSDP2's prefetch of the next one: `sharding_transient` counts
2 x the largest unit's parameters in the gathered dtype plus its fp32 gradients. Under
autocast the gathered parameters are already 16-bit (MixedPrecisionPolicy), so no extra
bf16 weight copies are saved. Activations are per rank and do not shrink with W.

The seed guide quotes ~22 GB without and ~9 GB with checkpointing for ViT-Large at batch
64 (bf16); counted this way (2 global views per image, a teacher and a Gram teacher beside
the student, out_dim 8192) the figures are higher: about 45 GiB and 16 GiB. The states
alone (weights of three models, gradients, AdamW) take 7 GiB, so ~9 GB cannot hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from dinox.errors import UserError
from dinox.losses.ibot import chunk_rows
from dinox.run.signals import EXIT_WONT_FIT

GIB = 1024**3

FP32 = 4
RESIDUAL_BYTES = FP32
CONTEXT_BYTES = int(0.75 * GIB)
FRAGMENTATION = 0.10
DINO_HEAD_HIDDEN = 2048
DINO_HEAD_BOTTLENECK = 256


def vit_param_count(*, patch_size: int, embed_dim: int, depth: int, mlp_hidden_dim: int,
                    num_registers: int, img_size: int, in_chans: int = 3, swiglu: bool = False) -> int:
    """Parameters of a standard pre-norm ViT with registers and LayerScale.

    Patch embedding (conv p x p), class and register tokens, learned position embedding
    for the (img/p)^2 patches, and per block two LayerNorms, qkv and proj with biases, the
    MLP with biases (SwiGLU: a fused w12 of width 2m), two LayerScales; a final LayerNorm.
    ViT-L/14 gives 303.6M, ViT-g/14 (1408, 40, mlp 6144; Zhai et al. 2022) 1011M.
    """
    d, m = embed_dim, mlp_hidden_dim
    embed = in_chans * patch_size * patch_size * d + d
    tokens = (1 + num_registers) * d
    pos = (img_size // patch_size) ** 2 * d
    attn = 3 * d * d + 3 * d + d * d + d
    mlp = (d * 2 * m + 2 * m if swiglu else d * m + m) + m * d + d
    block = 2 * 2 * d + attn + mlp + 2 * d
    return embed + tokens + pos + depth * block + 2 * d


def dino_head_param_count(in_dim: int, out_dim: int, hidden_dim: int = DINO_HEAD_HIDDEN,
                          bottleneck_dim: int = DINO_HEAD_BOTTLENECK, nlayers: int = 3) -> int:
    """Parameters of the DINO head (`dinox.model.head.DINOHead`): an MLP with biases to
    the bottleneck, then a weight-normalised bias-free last layer (weight + gain)."""
    dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
    mlp = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    return mlp + bottleneck_dim * out_dim + out_dim


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    sharding_transient: int
    activations: int
    teacher_transient: int
    head_logits: int
    overhead: int
    total: int
    inputs: dict = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict[str, int]:
        """The byte counts, without the inputs."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "inputs"}


def _tokens_per_view(size: int, patch_size: int, num_registers: int) -> int:
    return (size // patch_size) ** 2 + 1 + num_registers


def block_activation_bytes_per_token(*, embed_dim: int, num_heads: int, mlp_hidden_dim: int,
                                     amp: bool, swiglu: bool = False) -> int:
    """Bytes one transformer block saves for backward per token (see module docstring)."""
    elem = 2 if amp else FP32
    mlp_items = 4 if swiglu else 2
    return (2 * RESIDUAL_BYTES * embed_dim + elem * (8 * embed_dim + mlp_items * mlp_hidden_dim)
            + FP32 * num_heads + 4 * FP32)


def estimate_training_memory(*, params_backbone: int, params_head: int, embed_dim: int, depth: int,
                             num_heads: int, mlp_hidden_dim: int, patch_size: int, num_registers: int,
                             batch_size: int, global_size: int, n_global: int = 2, local_size: int = 96,
                             n_local: int = 0, amp: bool, grad_checkpoint: bool, out_dim: int,
                             swiglu: bool = False, head_hidden_dim: int = DINO_HEAD_HIDDEN,
                             head_bottleneck_dim: int = DINO_HEAD_BOTTLENECK,
                             context_bytes: int = CONTEXT_BYTES, shard_world: int = 1,
                             largest_unit_params: int = 0, ibot_rows_per_image: float = 0.0,
                             gram_teacher_scale: int = 1, dense: bool = False,
                             dense_teacher_scale: int = 1) -> MemoryEstimate:
    """Peak device memory of one training micro-step of `batch_size` images, in bytes, on one
    rank (`shard_world` > 1: FSDP2 over that many ranks, see the module docstring).

    `mlp_hidden_dim` is the width actually built: for SwiGLU the reduced width
    (`dinox.model.vit.swiglu_hidden_dim`), not the nominal 4 x embed_dim.
    `ibot_rows_per_image`: the masked patches iBOT scores per image, on average (so that an
    estimate at another batch size, as a proposal makes, scales them with the batch).
    """
    inputs = dict(locals())
    elem = 2 if amp else FP32
    student_params = params_backbone + params_head
    shards = max(1, int(shard_world))
    weights = -(-FP32 * (2 * student_params + params_backbone) // shards)
    gradients = -(-FP32 * student_params // shards)
    optimizer = -(-2 * FP32 * student_params // shards)
    sharding_transient = largest_unit_params * (2 * elem + FP32) if shards > 1 else 0

    global_tokens = _tokens_per_view(global_size, patch_size, num_registers)
    local_tokens = _tokens_per_view(local_size, patch_size, num_registers) if n_local else 0
    student_tokens = batch_size * (n_global * global_tokens + n_local * local_tokens)
    per_block = student_tokens * block_activation_bytes_per_token(
        embed_dim=embed_dim, num_heads=num_heads, mlp_hidden_dim=mlp_hidden_dim, amp=amp, swiglu=swiglu)
    if grad_checkpoint:
        blocks = depth * student_tokens * RESIDUAL_BYTES * embed_dim + per_block
    else:
        blocks = depth * per_block
    backward_buffers = per_block
    images = batch_size * 3 * (n_global * global_size**2 + n_local * local_size**2) * (FP32 + (2 if amp else 0))
    final_norm = student_tokens * 2 * RESIDUAL_BYTES * embed_dim
    amp_weight_copies = 2 * student_params if amp and shards == 1 else 0
    activations = blocks + backward_buffers + images + final_norm + amp_weight_copies

    teacher_tokens = batch_size * n_global * global_tokens
    mlp_items = 4 if swiglu else 2
    per_token = RESIDUAL_BYTES * embed_dim + elem * (embed_dim + mlp_items * mlp_hidden_dim)
    teacher_transient = teacher_tokens * per_token
    # the high-resolution Gram teacher's and the dense keys' no-grad forwards run after the
    # teacher's, one at a time, on the enlarged views (scale^2 the patches) and their image
    for scale in (gram_teacher_scale, dense_teacher_scale if dense else 1):
        if scale > 1:
            big = global_size * scale
            big_tokens = batch_size * n_global * _tokens_per_view(big, patch_size, num_registers)
            teacher_transient = max(teacher_transient,
                                    big_tokens * per_token + batch_size * n_global * 3 * big**2 * FP32)

    student_rows = batch_size * (n_global + n_local)
    teacher_rows = batch_size * n_global
    head_acts = student_rows * (elem * (embed_dim + 4 * head_hidden_dim + 2 * head_bottleneck_dim)
                                + FP32 * head_bottleneck_dim)
    last_layer_weight = out_dim * head_bottleneck_dim * (2 * FP32 + (2 if amp else 0))
    logits = student_rows * out_dim * (elem + 3 * FP32) + teacher_rows * out_dim * (elem + 2 * FP32)
    # iBOT at the batch's masked patches: the teacher's fp32 targets for all of them, the
    # head MLP activations, and one chunk's logits with their softmax work (the heads run
    # `dinox.losses.ibot.chunk_rows` rows at a time, the student's recomputed in backward).
    ibot_rows = round(batch_size * ibot_rows_per_image)
    chunk = min(ibot_rows, chunk_rows(out_dim))
    logits += (ibot_rows * (out_dim * FP32 + 2 * (4 * head_hidden_dim + head_bottleneck_dim) * elem)
               + chunk * out_dim * (2 * elem + 5 * FP32))
    patches = (global_size // patch_size) ** 2
    gram = teacher_rows * (2 * patches * embed_dim * FP32 + 3 * patches * patches * FP32)
    # the dense term's InfoNCE scores every matched student token of a view against every
    # sampled teacher token of the batch: per direction (both kept for backward) the fp32
    # logits, their softmax and its gradient, (batch x patches)^2 each, and the keys
    points = batch_size * patches
    dense_scores = n_global * (3 * points * points * FP32 + 2 * points * embed_dim * FP32) if dense else 0
    head_logits = head_acts + last_layer_weight + logits + gram + dense_scores

    subtotal = (weights + gradients + optimizer + sharding_transient
                + max(teacher_transient, activations + head_logits))
    overhead = int(FRAGMENTATION * subtotal) + context_bytes
    return MemoryEstimate(
        weights=weights, gradients=gradients, optimizer=optimizer, sharding_transient=sharding_transient,
        activations=activations,
        teacher_transient=teacher_transient, head_logits=head_logits, overhead=overhead,
        total=subtotal + overhead, inputs=inputs,
    )


def fits(estimate: MemoryEstimate, device_memory_bytes: int | None, headroom: float = 0.9) -> bool:
    """Whether the estimate fits in `headroom` of the device (True when memory is unknown)."""
    if not device_memory_bytes:
        return True
    return estimate.total <= headroom * device_memory_bytes


def _reestimate(estimate: MemoryEstimate, **changes) -> MemoryEstimate:
    return estimate_training_memory(**{**estimate.inputs, **changes})


def _largest_fitting_batch(estimate: MemoryEstimate, device_memory_bytes: int, headroom: float,
                           **changes) -> tuple[int, MemoryEstimate] | None:
    batch = estimate.inputs["batch_size"] // 2
    while batch >= 1:
        candidate = _reestimate(estimate, batch_size=batch, **changes)
        if fits(candidate, device_memory_bytes, headroom):
            return batch, candidate
        batch //= 2
    return None


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def suggestions(estimate: MemoryEstimate, device_memory_bytes: int, *, accumulation_steps: int = 1,
                headroom: float = 0.9, ranks: int = 1) -> list[str]:
    """Concrete ways to make a refused configuration fit; empty when it already fits.

    Smaller micro-batches are found by halving, with accumulation raised so the effective
    batch (batch_size x accumulation_steps, per rank) stays the same; a proposal with another
    number of FSDP2 ranks keeps the effective batch over all `ranks` the run was planned for.
    """
    if fits(estimate, device_memory_bytes, headroom):
        return []
    usable = headroom * device_memory_bytes
    inputs = estimate.inputs
    batch = inputs["batch_size"]
    effective = batch * accumulation_steps
    out: list[str] = []

    toggles = {"grad_checkpoint": "--grad-checkpoint", "amp": "--amp"}
    for key, flag in toggles.items():
        if not inputs[key]:
            candidate = _reestimate(estimate, **{key: True})
            verdict = "fits" if fits(candidate, device_memory_bytes, headroom) else "still too large"
            out.append(f"enable {flag}: estimated {_gib(candidate.total)} ({verdict})")

    off = [key for key in toggles if not inputs[key]]
    for changes in ({}, {key: True for key in off}) if off else ({},):
        found = _largest_fitting_batch(estimate, device_memory_bytes, headroom, **changes)
        if found:
            small, candidate = found
            accumulation = -(-effective // small)
            flags = " ".join(toggles[key] for key in changes)
            out.append(
                f"{flags + ' ' if flags else ''}--batch-size {small} --accumulation-steps {accumulation} "
                f"(effective batch {small * accumulation}, was {effective}): estimated {_gib(candidate.total)}"
            )
            break

    if inputs["n_local"]:
        candidate = _reestimate(estimate, n_local=inputs["n_local"] // 2)
        out.append(f"use fewer local crops (n_local {inputs['n_local']} -> {inputs['n_local'] // 2}): "
                   f"estimated {_gib(candidate.total)}")

    one_device_batch = any("--batch-size" in line for line in out)
    world = fsdp_world_that_fits(estimate, device_memory_bytes, headroom)
    if world is not None and world > inputs["shard_world"]:
        candidate = _reestimate(estimate, shard_world=world)
        out.insert(0, f"shard with FSDP2 over {world} devices: torchrun --nproc-per-node {world} ... --parallel fsdp "
                      f"(per-rank estimate {_gib(candidate.total)}; --batch-size {batch} is per rank, so the "
                      f"effective batch becomes {effective * world}; several nodes: docs/phase5_big_run.md)")
    if world is None and not one_device_batch:   # a model too big for one device at any batch
        sharded = _smallest_sharded_fit(estimate, device_memory_bytes, headroom)
        if sharded is not None:
            devices, small, candidate = sharded
            effective_now = effective * ranks
            accumulation = -(-effective_now // (small * devices))
            out.insert(0, f"shard with FSDP2 over {devices} devices at --batch-size {small} per rank "
                          f"--accumulation-steps {accumulation} (effective batch {small * accumulation * devices}, "
                          f"was {effective_now}): torchrun --nproc-per-node {devices} ... --parallel fsdp (per-rank "
                          f"estimate {_gib(candidate.total)}; several nodes: docs/phase5_big_run.md)")
    if not one_device_batch and world is None:
        floor = _reestimate(estimate, batch_size=1, grad_checkpoint=True, amp=True)
        states = estimate.weights + estimate.gradients + estimate.optimizer
        out.append(
            f"no batch size fits {_gib(int(usable))} usable: even --grad-checkpoint --amp --batch-size 1 "
            f"--accumulation-steps {effective} needs {_gib(floor.total)} (weights, gradients and AdamW state "
            f"alone {_gib(states)}); use a device with more memory (e.g. a 128 GB unified-memory APU or an "
            f"80 GB GPU) or shard the model over several GPUs with torchrun"
        )
    return out


def _fsdp_worlds(estimate: MemoryEstimate, largest: int = 1024):
    """The FSDP2 world sizes worth planning for, smallest first: 2, 4, ... `largest`; none for
    an estimate that does not know its largest sharding unit."""
    if not estimate.inputs.get("largest_unit_params", 0):
        return
    world = 2
    while world <= largest:
        yield world
        world *= 2


def _smallest_sharded_fit(estimate: MemoryEstimate, device_memory_bytes: int,
                          headroom: float) -> tuple[int, int, MemoryEstimate] | None:
    """(world, per-rank batch, estimate): the smallest FSDP2 world at which some smaller
    per-rank batch fits each device (the largest such batch, by halving), for a configuration
    whose own per-rank batch fits at no world size; None when none does."""
    for world in _fsdp_worlds(estimate):
        found = _largest_fitting_batch(estimate, device_memory_bytes, headroom, shard_world=world)
        if found:
            return world, *found
    return None


def fsdp_world_that_fits(estimate: MemoryEstimate, device_memory_bytes: int, headroom: float = 0.9,
                         largest: int = 1024) -> int | None:
    """The smallest power-of-two FSDP2 world size (>= 2) at which the same per-rank batch and
    settings fit each device; None when even `largest` ranks do not (activations per rank)."""
    return next((world for world in _fsdp_worlds(estimate, largest)
                 if fits(_reestimate(estimate, shard_world=world), device_memory_bytes, headroom)), None)


def format_estimate(estimate: MemoryEstimate) -> str:
    """A human-readable breakdown, one component a line."""
    inputs = estimate.inputs
    head = "estimated peak training memory"
    if inputs and inputs.get("shard_world", 1) > 1:
        head += f" per rank of {inputs['shard_world']} (FSDP2)"
    if inputs:
        head += (f" (batch {inputs['batch_size']}, {inputs['n_global']}x{inputs['global_size']}px"
                 + (f" + {inputs['n_local']}x{inputs['local_size']}px" if inputs["n_local"] else "")
                 + f", {'amp bf16' if inputs['amp'] else 'fp32'}"
                 + f", grad checkpoint {'on' if inputs['grad_checkpoint'] else 'off'})")
    rows = [
        ("weights (student, teacher, Gram teacher; fp32)", estimate.weights),
        ("gradients (fp32)", estimate.gradients),
        ("AdamW moments (fp32)", estimate.optimizer),
        *([("FSDP2 gathered units (2 in flight) and their gradients", estimate.sharding_transient)]
          if estimate.sharding_transient else []),
        ("student activations", estimate.activations),
        ("head, logits, Gram matrices", estimate.head_logits),
        ("teacher forward (before the student; larger one counts)", estimate.teacher_transient),
        ("allocator overhead and device context", estimate.overhead),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [head + ":"]
    lines += [f"  {label:<{width}}  {value / GIB:8.2f} GiB" for label, value in rows]
    lines.append(f"  {'total':<{width}}  {estimate.total / GIB:8.2f} GiB")
    return "\n".join(lines)


def _masked_patches_per_image(cfg) -> float:
    """Masked patch tokens per image on average: its 2 global views x the share of views
    masked x the mean mask ratio x patches per view."""
    s = cfg.ssl
    patches = (cfg.views.img_size // cfg.model.vit_patch) ** 2
    mean_ratio = (s.ibot_mask_ratio_min + s.ibot_mask_ratio_max) / 2
    return 2 * s.ibot_mask_probability * mean_ratio * patches


class WontFit(UserError):
    """A run that fits no memory it was planned for (the dry run's and a launch's exit 3)."""

    exit_code = EXIT_WONT_FIT


def plan_memory(cfg, device_memory_gb: float | None, device_total_bytes: int | None, *,
                world_size: int = 1) -> dict:
    """Build the run's networks on the meta device, count parameters and estimate the
    training peak against `device_memory_gb` (or the detected device's memory), per rank of
    `world_size` when the run is sharded (`--parallel fsdp`)."""
    import torch

    from dinox.model.dino_model import build_dino_model
    from dinox.model.vit import swiglu_hidden_dim

    m, v, o = cfg.model, cfg.views, cfg.optim
    try:
        with torch.device("meta"):
            model = build_dino_model(m, img_size=v.img_size)
    except (RuntimeError, TypeError, OverflowError) as exc:
        # a weight of over 2**63 bytes ("Storage size calculation overflowed"), or a width past
        # int64 itself ("Overflow when unpacking long long")
        if "overflow" not in str(exc).lower():
            raise
        raise WontFit(
            f"the model fits no device: one of its weights would hold more than 2**63 bytes (--vit-dim {m.vit_dim}, "
            f"--vit-mlp {m.vit_mlp}, --out-dim {m.out_dim}, --head-hidden {m.head_hidden}, --head-bottleneck "
            f"{m.head_bottleneck}); give widths of a real ViT (vit-giant: --vit-dim 1408)") from None
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    heads = [model.head] + ([model.ibot_head] if model.has_ibot else [])
    head_params = sum(p.numel() for head in heads for p in head.parameters())
    units = [*model.backbone.blocks, *heads]
    largest_unit = max(sum(p.numel() for p in unit.parameters()) for unit in units)
    sharded_world = world_size if cfg.runtime.parallel == "fsdp" else 1
    estimate = estimate_training_memory(
        params_backbone=backbone_params, params_head=head_params, embed_dim=m.vit_dim, depth=m.vit_depth,
        num_heads=m.vit_heads, mlp_hidden_dim=swiglu_hidden_dim(m.vit_mlp) if m.swiglu else m.vit_mlp,
        patch_size=m.vit_patch, num_registers=m.registers, batch_size=o.batch_size, global_size=v.img_size,
        n_global=2, local_size=v.local_size, n_local=v.local_crops, amp=cfg.runtime.amp,
        grad_checkpoint=cfg.runtime.grad_checkpoint, out_dim=m.out_dim, swiglu=m.swiglu,
        head_hidden_dim=m.head_hidden, head_bottleneck_dim=m.head_bottleneck,
        shard_world=sharded_world, largest_unit_params=largest_unit,
        ibot_rows_per_image=_masked_patches_per_image(cfg) if model.has_ibot else 0.0,
        gram_teacher_scale=cfg.ssl.gram_teacher_scale, dense=cfg.ssl.dense_weight > 0,
        dense_teacher_scale=cfg.ssl.dense_teacher_scale,
    )
    capacity = int(device_memory_gb * 1024**3) if device_memory_gb else device_total_bytes
    verdict = fits(estimate, capacity) if capacity else True
    advice = [] if verdict else suggestions(estimate, capacity, accumulation_steps=o.accumulation_steps,
                                                   ranks=world_size)
    return {
        "backbone_params": backbone_params,
        "head_params": head_params,
        "estimate": estimate,
        "estimate_text": format_estimate(estimate),
        "device_memory_bytes": capacity,
        "world_size": sharded_world,
        "fits": verdict,
        "suggestions": advice,
    }
