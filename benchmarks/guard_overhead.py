"""What the guard (restore after every optimizer step, item 3 of issue 14; the per-forward checks of
items 3 and 4) costs per training step, measured in one process: the plain timm twin, the HAT
network with the guard, and the same HAT network with the guard switched off (its optimizer hooks
removed, its forward calls made no-ops), one step each per repetition, in rotating order.

Usage:  python benchmarks/guard_overhead.py [--models hat_resnet18s hat_alexnet ...] [--reps 15]
        [--optimizer sgd|adamw]

The step is benchmarks/model_overhead.py's: task 1 of 5 with task 0 trained (half of every layer's
units owned), forward at mask scale 100, cross-entropy plus the regulariser, backward, optimizer
step (SGD with momentum 0.9 by default; ``--optimizer adamw`` with weight decay 0.01). One thread,
process CPU time; medians of the per-repetition ratios to the plain step. Switching the guard off is
for this measurement only: the package has no such switch.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import model_overhead as mo  # noqa: E402

from avalanche_hat import guard  # noqa: E402

FORWARD_CALLS = ("forward_start", "note_clean", "record_input_ownership", "record_copy")


@contextlib.contextmanager
def guard_off():
    """The guard's hooks removed and its forward calls no-ops (training_forward keeps only the locks)."""
    saved = {n: getattr(guard, n) for n in (*FORWARD_CALLS, "training_forward")}
    for h in guard._HOOKS:
        h.remove()
    guard._HOOKS.clear()
    for n in FORWARD_CALLS:
        setattr(guard, n, lambda *a, **k: None)
    guard.training_forward = lambda layer, task_id, locked, trained=None: frozenset(locked)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(guard, n, f)
        guard.install()


def step_fn(model, x, y, hat, optimizer):
    if optimizer == "sgd":
        return mo.train_step_fn(model, x, y, hat)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        out = model(x, task_id=1, mask_scale=mo.MASK_SCALE) if hat else model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()

    return step


def main() -> None:
    names = sorted({s[0] for s in mo.SETTINGS})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["hat_resnet18s", "hat_resnet34s", "hat_alexnet", "hat_mlp"],
                        choices=names)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clock = time.process_time
    print(f"torch {torch.__version__}, 1 thread, process clock, load average {os.getloadavg()[0]:.1f}, "
          f"{args.reps} repetitions (median), optimizer {args.optimizer}")
    print("| model | input | plain ms | HAT ms, guard | HAT ms, no guard | ratio, guard | ratio, no guard | guard / no guard |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in mo.SETTINGS:
        if setting[0] not in args.models:
            continue
        hat, plain, x, y = mo.make_pair(setting)
        on, base = step_fn(hat, x, y, True, args.optimizer), step_fn(plain, x, y, False, args.optimizer)

        def off():
            with guard_off():
                t0 = clock()
                on()
                return clock() - t0

        def timed(fn):
            t0 = clock()
            fn()
            return clock() - t0

        for _ in range(args.warmup):
            base(), on(), off()
        times = {"plain": [], "on": [], "off": []}
        order = ["plain", "on", "off"]
        for r in range(args.reps):
            for name in order[r % 3:] + order[:r % 3]:
                times[name].append(off() if name == "off" else timed(base if name == "plain" else on))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        r_on = statistics.median(h / p for h, p in zip(times["on"], times["plain"]))
        r_off = statistics.median(h / p for h, p in zip(times["off"], times["plain"]))
        r_rel = statistics.median(h / p for h, p in zip(times["on"], times["off"]))
        name, batch, chans, size, _ = setting
        print(f"| {name} | {batch}x{chans}x{size}x{size} | {med['plain']:.1f} | {med['on']:.1f} | {med['off']:.1f} | "
              f"{r_on:.3f}x | {r_off:.3f}x | {r_rel:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
