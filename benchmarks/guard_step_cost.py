"""What the guard's restore adds to ``optimizer.step()`` alone, the part of a training step it touches.

    python benchmarks/guard_step_cost.py [--reps 41] [--common]

For hat_alexnet, hat_mlp and hat_resnet18s (batch 32, task 1 of 5 with task 0 trained, half of
every layer's units owned, as benchmarks/model_overhead.py builds them) the gradient of one
backward is kept and ``SGD(momentum=0.9).step()`` is timed with the guard's hooks and without
them, alternately. The step without the hooks moves the protected entries (momentum), so every
timed step with the hooks has entries to write back: the restore's worst case, not its common one
(zero gradient, no state: nothing to write). ``--common`` times that common case instead: every
gradient zeroed and plain SGD, so that no step moves anything and the restore only compares. One
thread, process CPU time, medians.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import model_overhead as mo  # noqa: E402

from avalanche_hat import guard  # noqa: E402
from avalanche_hat.mechanism import fused  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=41)
    parser.add_argument("--common", action="store_true",
                        help="the common case: zero gradients, no momentum (the restore writes nothing)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    case = "common case: nothing to write back" if args.common else "worst case: entries to write back every step"
    print(f"torch {torch.__version__}, 1 thread, fused kernels: {fused.build()}, {args.reps} repetitions (median), "
          f"{case}")
    print("| model | batch | step with guard (ms) | without (ms) | guard adds (ms) |")
    print("|---|---|---:|---:|---:|")
    for setting in (mo.SETTINGS[2], mo.SETTINGS[3], mo.SETTINGS[0]):
        hat, _, x, y = mo.make_pair(setting)
        opt = torch.optim.SGD(hat.parameters(), lr=0.01, momentum=0.0 if args.common else 0.9)
        hat.train()
        torch.nn.functional.cross_entropy(hat(x, task_id=1, mask_scale=mo.MASK_SCALE), y).backward()
        if args.common:
            for p in hat.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        for _ in range(3):
            opt.step()
        on, off = [], []
        for _ in range(args.reps):
            t0 = time.process_time()
            opt.step()
            on.append(time.process_time() - t0)
            for h in guard._HOOKS:
                h.remove()
            guard._HOOKS.clear()
            t0 = time.process_time()
            opt.step()
            off.append(time.process_time() - t0)
            guard.install()
        a, b = statistics.median(on) * 1e3, statistics.median(off) * 1e3
        print(f"| {setting[0]} | {setting[1]} | {a:.2f} | {b:.2f} | {a - b:.2f} |")


if __name__ == "__main__":
    main()
