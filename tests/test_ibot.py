"""iBOT: the masked-patch loss against a hand computation, the block-mask generator's
statistics, KoLeo's weighting over the global views, the entropy-wall guard."""
from __future__ import annotations

import math

import pytest
import torch

from _train_support import only_run, processed_root, train_args  # noqa: F401
from dinox.cli import main
from dinox.data.masking import MaskingConfig, batch_masks, block_mask
from dinox.losses.ibot import IBOTLoss
from dinox.losses.koleo import KoLeoLoss
from dinox.observe.anomaly import AnomalyGuard, EntropyWall
from dinox.run.checkpoint import load_checkpoint


def test_ibot_loss_matches_a_hand_computation():
    temp = 0.1
    masks = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-0.2, 0.3, 0.1]])  # the 3 masked patches
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])

    def cross_entropy(t, s):
        z = [math.exp(v / temp) for v in s]
        return -sum(ti * math.log(zi / sum(z)) for ti, zi in zip(t, z))

    rows = [cross_entropy(teacher[i].tolist(), student[i].tolist()) for i in range(3)]
    # image 0 has 2 masked patches, image 2 has 1, image 1 none; divide by the 3 images
    expected = ((rows[0] + rows[1]) / 2 + rows[2] / 1) / 3
    got = IBOTLoss(3, student_temp=temp)(student, teacher, masks)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        IBOTLoss(3)(student[:2], teacher[:2], masks)


def test_ibot_targets_are_centred_and_sharpened_like_dino():
    loss = IBOTLoss(4, center_momentum=0.5)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    loss.accumulate_center(logits)
    loss.apply_center_update()
    assert torch.allclose(loss.center, torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    probs = loss.teacher_probs(logits, 0.04)
    assert torch.allclose(probs.sum(-1), torch.ones(2)) and probs[0].argmax() == 0


def test_block_masks_have_the_requested_ratios_and_shapes():
    g = torch.Generator().manual_seed(0)
    cfg = MaskingConfig()
    masks = batch_masks(256, 8, 8, g, cfg)
    assert masks.shape == (256, 64) and masks.dtype == torch.bool
    counts = masks.sum(-1)
    assert int((counts > 0).sum()) == 128  # half of the images are masked
    ratios = counts[counts > 0].float() / 64
    assert 0.05 <= float(ratios.min()) and float(ratios.max()) <= 0.5 + 1e-6
    assert 0.2 <= float(ratios.mean()) <= 0.35  # spread over (0.1, 0.5), blocks fill slightly under
    # masks are unions of rectangles: a masked patch has a masked 4-neighbour (no isolated pixels)
    grid = masks.view(256, 8, 8)
    padded = torch.nn.functional.pad(grid.float(), (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    isolated = grid & (neighbours.view_as(grid) == 0)
    assert float(isolated.sum()) / float(grid.sum()) < 0.02
    # deterministic from the generator
    again = batch_masks(256, 8, 8, torch.Generator().manual_seed(0), cfg)
    assert torch.equal(masks, again)
    assert int(block_mask(4, 4, 6, torch.Generator().manual_seed(1)).sum()) <= 6


def test_masking_edge_cases():
    g = torch.Generator().manual_seed(0)
    assert batch_masks(4, 2, 2, g, MaskingConfig(sample_probability=0.0)).sum() == 0
    tiny = batch_masks(1, 2, 2, g)  # one image of 4 patches still gets 2 masked patches for the head
    assert int(tiny.sum()) >= 2
    with pytest.raises(ValueError):
        batch_masks(4, 4, 4, g, MaskingConfig(ratio_range=(0.6, 0.2)))


def test_koleo_is_summed_over_the_global_views():
    from dinox.config import resolve
    from dinox.data.augment import CTAugment
    from dinox.train.optim import autocast
    from dinox.train.ssl import DINOSSL

    cfg = resolve({"config": "vit-tiny", "vit_depth": 1, "vit_dim": 32, "vit_heads": 2, "vit_mlp": 64,
                   "img_size": 16, "local_crops": 0, "out_dim": 16, "head_hidden": 16, "head_bottleneck": 8,
                   "koleo_weight": 0.1},  # DINOv2's weight: the tiny recipe's own is small
                  hardware_preset="cpu", device_kind="cpu").cfg
    torch.manual_seed(0)
    ssl = DINOSSL(cfg, torch.device("cpu"))
    stacks = torch.randint(-1000, 1000, (6, 3, 24, 24), generator=torch.Generator().manual_seed(1))
    views = CTAugment(cfg.views.to_augment())(stacks.to(torch.int16), torch.Generator().manual_seed(2))
    seen = {}

    def backward(loss):
        seen["loss"] = loss

    values = ssl.forward_backward(views, {"teacher_temp": 0.04}, autocast=lambda: autocast(torch.device("cpu"), None),
                                  backward=backward)
    with torch.no_grad():
        cls = ssl.student(torch.cat(views.global_views))["cls"].chunk(2)
    koleo = KoLeoLoss()
    assert float(values["loss_koleo"]) == pytest.approx(float(koleo(cls[0]) + koleo(cls[1])), rel=1e-5)
    expected = (values["loss_dino"] + cfg.ssl.koleo_weight * values["loss_koleo"]
                + cfg.ssl.dense_weight * values["loss_dense"] + cfg.ssl.gram_weight * values["loss_gram"])
    assert float(seen["loss"].detach()) == pytest.approx(float(expected), rel=1e-6)


def test_entropy_wall_guard_fires_once_after_the_warmup():
    wall = EntropyWall(out_dim=64, start_step=10, window=5, advice="lower --teacher-temp")
    guard = AnomalyGuard(entropy_wall=wall)
    uniform = math.log(64)
    fired = [guard.check_entropy(step, uniform) for step in range(20)]
    hits = [a for a in fired if a is not None]
    assert len(hits) == 1 and hits[0].kind == "entropy_wall" and hits[0].step == 14
    assert hits[0].wants_checkpoint and "lower --teacher-temp" in hits[0].message
    assert guard.check_entropy(20, 0.9 * uniform) is None  # away from the wall: re-armed
    state = guard.state_dict()
    other = AnomalyGuard(entropy_wall=EntropyWall(64, 10, 5))
    other.load_state_dict(state)
    assert other.entropy_wall.state_dict() == wall.state_dict()


def test_entropy_wall_advice_leads_with_the_measured_levers_and_says_what_a_resume_refuses():
    from dinox.config import resolve
    from dinox.observe.anomaly import entropy_wall_advice

    # DINOv2's settings on a CPU batch: what kept the scaled-down big recipe at the wall
    dinov2 = resolve({"config": "custom", "vit_patch": 16, "vit_dim": 192, "vit_depth": 6, "vit_heads": 3,
                      "batch_size": 32, "layerscale": 1e-5, "head_bn": False, "out_dim": 65536,
                      "distinct_windows": True, "standardize_views": False}, hardware_preset="cpu",
                     device_kind="cpu").cfg
    advice = entropy_wall_advice(dinov2)
    model_part, resume_part = advice.split(" (these change the model: start a new run with them); ")
    for lever in ("--layerscale 0.1", "--head-bn true", "--out-dim 1024"):
        assert lever in model_part
    assert model_part.index("--layerscale") < model_part.index("--head-bn") < model_part.index("--out-dim")
    assert resume_part.startswith("views that share their intensity statistics (--distinct-windows false "
                                  "--standardize-views true)")
    assert resume_part.endswith("(these can resume from the emergency checkpoint: --resume PATH)")
    # The count follows the global batch, as resolve()'s: 65536 is right for 64 ranks of 32
    assert "--out-dim" not in entropy_wall_advice(dinov2, world_size=64)
    # The recipes already have every lever of the model: only what a resume accepts is left
    for preset in ({"config": "vit-tiny"}, {"config": "vit-large", "batch_size": 32}):
        cfg = resolve(preset, hardware_preset="cpu", device_kind="cpu").cfg
        advice = entropy_wall_advice(cfg)
        assert "start a new run" not in advice and "--layerscale" not in advice and "--distinct-windows" not in advice
        # Sinkhorn-Knopp is named where the run does not use it already (the tiny recipe does)
        assert ("--centering sinkhorn" in advice) == (cfg.ssl.centering == "centering")
        # local crops only where the recipe has them and the run turned them off: the tiny
        # recipe has none on purpose (they cost a short run its retrieval)
        assert "--local-crops" not in advice
    no_locals = resolve({"config": "vit-large", "batch_size": 32, "local_crops": 0},
                        hardware_preset="cpu", device_kind="cpu").cfg
    assert "local crops (--local-crops 2, the recipe's)" in entropy_wall_advice(no_locals)


def test_injected_uniform_teacher_raises_the_entropy_wall(processed_root, tmp_path, monkeypatch, capsys):
    from dinox.losses.dino import DINOLoss

    def uniform(self, teacher_logits, teacher_temp, method="centering"):
        return torch.full_like(teacher_logits.float(), 1.0 / teacher_logits.shape[-1])

    monkeypatch.setattr(DINOLoss, "teacher_probs", uniform)
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "30", "--batch-size", "4",
                           "--ckpt-every", "100")) == 0
    printed = capsys.readouterr().out
    assert "ln(out_dim)" in printed and "Try:" in printed
    assert list(only_run(out).glob("checkpoint_emergency_*.pth"))


def test_emergency_checkpoints_are_rotated_to_the_newest_few(processed_root, tmp_path, monkeypatch):
    """One emergency checkpoint per anomaly episode or halt, each a whole checkpoint (20.5 GB
    for a ViT-Giant): a run requeued for weeks kept every one until the disk was full.
    --ckpt-keep-emergency N keeps the newest N (default 3; 0 keeps all)."""
    from dinox.train import loop

    monkeypatch.setattr(loop, "respond", lambda guard, anomalies, log, metrics: (True, False))   # an alarm a step
    out = tmp_path / "runs"
    assert main(train_args(processed_root, out, "--max-steps", "4", "--batch-size", "4", "--ckpt-every", "100",
                           "--ckpt-keep-emergency", "2", "--monitor-every", "0")) == 0
    run = only_run(out)
    assert sorted(p.name for p in run.glob("checkpoint_emergency_*")) == [
        f"checkpoint_emergency_{s:08d}.pth{end}" for s in (3, 4) for end in ("", ".sha256")]
    log = (run / "train.log").read_text()
    assert "rotated out checkpoint_emergency_00000002.pth (--ckpt-keep-emergency 2 keeps the newest)" in log


@pytest.mark.parametrize("halt", [False, True])
def test_an_alarm_of_the_in_training_eval_halts_with_halt_on_anomaly(processed_root, tmp_path, monkeypatch, halt):
    """The eval's alarms (collapse by effective rank, not learning) follow --halt-on-anomaly
    as the step's alarms do, and the run's last line names them either way."""
    from dinox.observe.anomaly import Anomaly, RetrievalProgress
    from dinox.run.signals import EXIT_ANOMALY

    def stalls_at_step_2(self, step, mean_rank, n):
        return Anomaly("not_learning", "warning", step, "not learning (injected)") if step == 2 else None

    monkeypatch.setattr(RetrievalProgress, "check", stalls_at_step_2)
    out = tmp_path / "runs"
    code = main(train_args(processed_root, out, "--max-steps", "4", "--batch-size", "4", "--eval-every", "2",
                           "--eval-n", "16", "--ckpt-every", "100", *(["--halt-on-anomaly"] if halt else [])))
    run = only_run(out)
    assert code == (EXIT_ANOMALY if halt else 0)
    assert [p.name for p in run.glob("checkpoint_emergency_*.pth")] == (["checkpoint_emergency_00000002.pth"]
                                                                       if halt else [])
    assert bool(list(run.glob("checkpoint_final_*.pth"))) is not halt
    log = (run / "train.log").read_text()
    assert "not learning (injected)" in log and ("halting on anomaly" in log) is halt
    last = [line for line in log.splitlines() if "halting on anomaly" in line or "training finished" in line]
    assert len(last) == 1 and last[0].endswith("alarms during the run: not_learning at step 2 (train.log has what "
                                               "each said)"), last


def test_resume_is_exact_with_ibot(processed_root, tmp_path):
    from test_train import assert_same_state, final_weights

    common = ("--batch-size", "4", "--ibot-weight", "1.0", "--drop-path", "0.1", "--local-crops", "2",
              "--local-size", "16", "--ckpt-every", "3", "--max-steps", "6", "--gram-start-step", "2",
              "--gram-refresh-every", "100")
    straight = tmp_path / "straight"
    assert main(train_args(processed_root, straight, *common)) == 0
    state = load_checkpoint(sorted(only_run(straight).glob("checkpoint_final_*.pth"))[-1])
    assert state["ibot_loss"] is not None and "mask_token" in state["student"]
    assert any(k.startswith("ibot_head.") for k in state["teacher"])
    split = tmp_path / "split"
    assert main(train_args(processed_root, split, *common)) == 0
    run = only_run(split)
    for path in run.glob("checkpoint_*0006.pth*"):
        path.unlink()
    assert main(train_args(processed_root, split, *common, "--resume", "auto")) == 0
    assert_same_state(final_weights(only_run(straight)), final_weights(run))


def test_chunked_head_loss_equals_the_whole_computation():
    """The iBOT head computes the per-patch loss in chunks, recomputing each chunk's logits in
    backward: the same values and gradients as one pass over all rows."""
    from dinox.model.head import DINOHead

    torch.manual_seed(0)
    head = DINOHead(16, 64, hidden_dim=32, bottleneck_dim=8)
    loss_fn = IBOTLoss(64, student_temp=0.1)
    x = torch.randn(37, 16)
    targets = torch.softmax(torch.randn(37, 64), dim=-1)
    whole = head(x, targets, loss_fn.row_cross_entropy)
    grads_whole = torch.autograd.grad(whole.sum(), [p for p in head.parameters() if p.requires_grad], allow_unused=True)
    chunked = head(x, targets, loss_fn.row_cross_entropy, chunk_rows=5)
    grads_chunked = torch.autograd.grad(chunked.sum(), [p for p in head.parameters() if p.requires_grad], allow_unused=True)
    torch.testing.assert_close(chunked, whole)
    reference = loss_fn.row_cross_entropy(head(x), targets)
    torch.testing.assert_close(whole, reference)
    for a, b in zip(grads_whole, grads_chunked):
        if a is not None:  # summed over chunks in another order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_chunked_teacher_targets_and_centre_equal_the_whole_computation(monkeypatch):
    import dinox.losses.ibot as ibot
    from dinox.model.head import DINOHead

    torch.manual_seed(1)
    head = DINOHead(16, 64, hidden_dim=32, bottleneck_dim=8)
    tokens = torch.randn(23, 16)
    whole, chunked = IBOTLoss(64), IBOTLoss(64)
    whole.center.normal_()
    chunked.center.copy_(whole.center)
    with torch.no_grad():
        logits = head(tokens)
    expected = whole.teacher_probs(logits, 0.05)
    whole.accumulate_center(logits)
    whole.apply_center_update()
    monkeypatch.setattr(ibot, "CHUNK_ELEMENTS", 64 * 4)  # 4 rows per chunk
    got = chunked.chunked_targets(head, tokens, 0.05, autocast=lambda: torch.autocast("cpu", enabled=False))
    torch.testing.assert_close(got, expected)
    chunked.apply_center_update()
    torch.testing.assert_close(chunked.center, whole.center)


def test_retrieval_progress_warns_once_when_the_mean_rank_stays_near_the_untrained_network_s():
    from dinox.observe.anomaly import RetrievalProgress

    guard = AnomalyGuard(retrieval=RetrievalProgress(start_step=100, advice="--context-mm 5"))
    n = 479                                     # chance mean rank (n + 1) / 2 = 240
    assert guard.check_retrieval(0, 180.0, n) is None          # the untrained network: 0.75 of chance
    assert guard.check_retrieval(50, 170.0, n) is None         # before start_step: not judged
    assert guard.check_retrieval(100, 100.0, n) is None        # 56 % of the untrained rank: under 60 %, learning
    # a run that learned, read with another n: the share of chance is compared, not the rank
    assert guard.check_retrieval(120, 50.0, 239) is None
    hit = guard.check_retrieval(150, 130.0, n)                 # 72 % of the untrained network's rank
    assert hit is not None and hit.kind == "not_learning" and hit.severity == "warning"
    assert not hit.wants_checkpoint and "130 of 479" in hit.message and "--context-mm 5" in hit.message
    assert guard.check_retrieval(200, 140.0, n) is None        # once
    resumed = AnomalyGuard(retrieval=RetrievalProgress(start_step=100))
    resumed.load_state_dict(guard.state_dict())
    assert resumed.retrieval.untrained == guard.retrieval.untrained and resumed.retrieval.reported
    # a few queries are too noisy to judge, and without a step-0 reading there is nothing to compare
    fresh = AnomalyGuard(retrieval=RetrievalProgress(start_step=10))
    assert fresh.check_retrieval(0, 8.0, 16) is None and fresh.check_retrieval(20, 8.0, 16) is None
    assert fresh.check_retrieval(20, 230.0, n) is None


def test_not_learning_advice_names_the_context_for_thin_slices():
    from dinox.config import resolve, with_values
    from dinox.observe.anomaly import build_guard, not_learning_advice

    cfg = resolve({"max_steps": 670}, hardware_preset="cpu").cfg
    assert cfg.views.context_mm == 10.0
    # the recipe's 10 mm already: a wider one, twice the neighbours' distance
    assert "wider 2.5D context (--context-mm 20, now 10)" in not_learning_advice(cfg, 1.25)
    thin = not_learning_advice(with_values(cfg, context_mm=0.0), 1.25)
    assert "--context-mm 10, now 0" in thin and "1.25 mm apart" in thin
    # adjacent 5 mm slices are 5 mm apart: the recipe's 10 mm first
    assert "--context-mm 10, now 0): the stacks' neighbours are about 5 mm" in not_learning_advice(
        with_values(cfg, context_mm=0.0), 5.0)
    assert "--context-mm 10, now 0): the stacks hold the adjacent slices" in not_learning_advice(
        with_values(cfg, context_mm=0.0), None)
    assert "--context-mm 24, now 0" in not_learning_advice(with_values(cfg, context_mm=0.0), 12.0)
    # the stack's own rounding: 12 mm on 5 mm slices takes z-2, z+2 (10 mm), 3 mm on 1.25 mm z-2, z+2
    assert "--context-mm 20, now 12" in not_learning_advice(with_values(cfg, context_mm=12.0), 5.0)
    assert "neighbours are about 2.5 mm" in not_learning_advice(with_values(cfg, context_mm=3.0), 1.25)
    assert "about 5 mm" in not_learning_advice(with_values(cfg, context_mm=6.0), 5.0)
    guard = build_guard(cfg)
    assert guard.retrieval.start_step == 335 and guard.entropy_wall.start_step == 20
