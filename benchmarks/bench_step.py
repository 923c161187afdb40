"""Seconds per training step of the SSL method (augment, masks, student/teacher/Gram-teacher
forward, every loss, backward, AdamW, EMA) for two settings of the recipe, interleaved so
that a busy or throttling machine slows both alike.

    .venv/bin/python benchmarks/bench_step.py                                   # the Gram policies
    .venv/bin/python benchmarks/bench_step.py --a gram_refresh_every=1 --b gram_refresh_every=100

Defaults: the vit-tiny recipe as the demo runs it (64 px, no local crops, batch 32, fp32,
1024 prototypes), steps timed after the Gram warm-up, A = the Gram teacher copied from the
EMA teacher every step (the tiny recipe), B = a frozen Gram snapshot (its own forward).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dinox.config import resolve
from dinox.data.augment import CTAugment
from dinox.train.optim import autocast, build_optimizer
from dinox.train.ssl import DINOSSL


def parse_setting(text: str) -> dict[str, object]:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        out[key] = type_of(value)
    return out


def type_of(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


class Stepper:
    def __init__(self, given: dict, batch: int, seed: int):
        self.cfg = resolve({"config": "vit-tiny", "out_dim": 1024, **given}, hardware_preset="cpu",
                           device_kind="cpu").cfg
        torch.manual_seed(seed)
        self.device = torch.device("cpu")
        self.ssl = DINOSSL(self.cfg, self.device)
        self.optimizer = build_optimizer(self.ssl.student)
        self.augment = CTAugment(self.cfg.views.to_augment())
        self.generator = torch.Generator().manual_seed(seed)
        self.stacks = torch.randint(-1000, 1500, (batch, 3, 96, 96), generator=self.generator).to(torch.int16)
        self.step = self.cfg.ssl.gram_start_step  # past the warm-up: the Gram policy in force

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.ssl.maybe_refresh_gram_teacher(self.step)
            views = self.augment(self.stacks, self.generator)
            masks = self.ssl.draw_masks(2 * self.stacks.shape[0], self.generator, self.device)
            values = self.ssl.forward_backward(views, {"teacher_temp": 0.04}, masks=masks, step=self.step,
                                               autocast=lambda: autocast(self.device, None),
                                               backward=lambda loss: loss.backward())
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ssl.finish_step(0.98)
            float(values["loss"])
            times.append(time.perf_counter() - start)
            self.step += 1
        return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="gram_refresh_every=1", help="recipe values of A, key=value[,key=value]")
    p.add_argument("--b", default="gram_refresh_every=100", help="recipe values of B")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4, help="alternations of A and B")
    p.add_argument("--steps", type=int, default=8, help="timed steps per round and setting")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steppers = {"A": Stepper(parse_setting(args.a), args.batch, 0), "B": Stepper(parse_setting(args.b), args.batch, 0)}
    for s in steppers.values():
        s.run(2)  # allocator and kernels warm
    times = {"A": [], "B": []}
    for _ in range(args.rounds):
        for name, s in steppers.items():
            times[name] += s.run(args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for name, setting in (("A", args.a), ("B", args.b)):
        t = times[name]
        print(f"{name} {setting:32s} median {statistics.median(t):.3f} s/step  "
              f"mean {statistics.mean(t):.3f}  ({len(t)} steps)")
    ratio = statistics.median(times["A"]) / statistics.median(times["B"])
    print(f"A / B = {ratio:.3f}")


if __name__ == "__main__":
    main()
