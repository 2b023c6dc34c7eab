"""Does HAT's training step cost grow with the number of tasks learned? The leaderboard's MLP
(784-400-400, one 10-way head per task, SGD with momentum over every parameter, as the strategy's
optimizer holds them) trains task k after k tasks are marked trained, for several k, against the
plain MLP in the same process; rounds interleave the cases so that a change of load hits all alike.

    python benchmarks/hat_step_vs_tasks.py [--tasks 50] [--rounds 7] [--steps 20]

Prints the median time per step of each case and its ratio to the plain step of the same round.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402

from avalanche_hat import HATConfig, hat_regularization, mark_task_trained  # noqa: E402
from avalanche_hat.bench.networks import HATMLP, PlainMLP  # noqa: E402
from avalanche_hat.mechanism import fused  # noqa: E402
from avalanche_hat.modules import TaskIndexedLinear  # noqa: E402


def hat_case(num_tasks: int, learned: int):
    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=num_tasks)
    body, head = HATMLP(1, 28, cfg), TaskIndexedLinear(400, 10, cfg)
    with torch.no_grad():  # earlier tasks own about half of the units, as after real training
        for _, layer in [("fc1", body.fc1), ("fc2", body.fc2)]:
            layer.mask_embedding[:learned] = torch.randn(learned, layer.mask_embedding.shape[1])
    for t in range(learned):
        mark_task_trained(body, t)
    params = list(body.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def step(x, y):
        opt.zero_grad()
        logits = head(body(x, task_id=learned, mask_scale=50.0), task_id=learned)
        loss = nn.functional.cross_entropy(logits, y) + 0.75 * hat_regularization(body, learned, 50.0)
        loss.backward()
        opt.step()
    return step


def plain_case(num_tasks: int):
    torch.manual_seed(0)
    body = PlainMLP(1, 28)
    heads = nn.ModuleList(nn.Linear(400, 10) for _ in range(num_tasks))
    opt = torch.optim.SGD(list(body.parameters()) + list(heads.parameters()), lr=0.01, momentum=0.9)

    def step(x, y):
        opt.zero_grad()
        nn.functional.cross_entropy(heads[0](body(x)), y).backward()
        opt.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=50)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"fused CPU kernels {'in use' if fused.build() else 'off'} (built before timing)")
    learned = sorted({1, 10, args.tasks // 2, args.tasks - 1})
    cases = {"plain": plain_case(args.tasks), **{f"HAT after {k} tasks": hat_case(args.tasks, k) for k in learned}}
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    for step in cases.values():  # warm-up
        for _ in range(3):
            step(x, y)
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, step in cases.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x, y)
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"{args.tasks} tasks, batch 64, {args.rounds} rounds of {args.steps} steps, 1 thread")
    for name, ts in times.items():
        ratio = statistics.median(t / p for t, p in zip(ts, times["plain"]))
        print(f"  {name:>20}: {1000 * statistics.median(ts):7.2f} ms per step, {ratio:.2f} x plain")


if __name__ == "__main__":
    main()
