"""What task-id prediction costs: class-incremental inference over T trained tasks against one
task-incremental forward (the task given), same network, same batch, in one process.

Usage:  python benchmarks/task_inference_cost.py [--networks mlp cnn hat_resnet18s] [--tasks 5 10 20]
        [--reps 15] [--threads 1] [--clock process|wall] [--json out.json]

Per network and number of tasks T, each repetition times, back to back in a rotating order:

- ``single``: one task's forward (backbone with its binary masks + its head): what inference costs
  when the task id is given;
- ``batched``: ``HATClassIncrementalModel(x)`` with T trained tasks: one batched pass through all T
  masked networks (``for_each_task``), the task scores (``mahalanobis``, the default, or ``energy``),
  their calibration and the log-probabilities over all classes;
- ``loop``: the same with ``model.batched = False`` (T separate forwards, then the same scoring).

The table shows the medians of the per-repetition ratios to ``single``. By default one thread and
the CPU time of the process (what stays stable on a shared machine). Masks, norms and heads are
random per task (the cost does not depend on what was learned), so each task leaves about half of
the features on (a HAT task trained with the usage penalty uses fewer: 18-40% of the MLP's on Split
Fashion-MNIST, which makes the Mahalanobis score cheaper); its Mahalanobis statistics are random
but well-formed, over the features it sets.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import timm

import avalanche_hat.timm_models  # noqa: F401  (registers the models)
from avalanche_hat import HATConfig, mark_task_trained
from avalanche_hat.bench.networks import build_trunk
from avalanche_hat.training import HATClassIncrementalModel

# network: (batch, channels, image size): the leaderboard's networks at its evaluation batch on
# Fashion-MNIST, and a CIFAR ResNet.
SETTINGS = {
    "mlp": (1000, 1, 28),
    "cnn": (256, 1, 28),
    "hat_resnet18s": (64, 3, 32),
}
CLASSES_PER_TASK = 2
CLOCKS = {"process": time.process_time, "wall": time.perf_counter}


def make_model(network: str, num_tasks: int, task_score: str, seed: int = 0) -> HATClassIncrementalModel:
    """A class-incremental HAT model with ``num_tasks`` trained tasks (random per-task state)."""
    torch.manual_seed(seed)
    batch, chans, size = SETTINGS[network]
    cfg = HATConfig(num_tasks=num_tasks, mask_init="normal")
    if network in ("mlp", "cnn"):
        backbone = build_trunk(network, in_chans=chans, img_size=size, hat_config=cfg)
    else:
        backbone = timm.create_model(network, hat_config=cfg, num_classes=0, in_chans=chans)
    model = HATClassIncrementalModel(backbone, num_classes=CLASSES_PER_TASK * num_tasks,
                                     classes_per_task=CLASSES_PER_TASK, task_score=task_score,
                                     feature_statistics=True)
    model.eval()
    probe = torch.randn(64, chans, size, size)
    with torch.no_grad():
        for t in range(num_tasks):
            model.register_task(t, range(CLASSES_PER_TASK * t, CLASSES_PER_TASK * (t + 1)))
            mark_task_trained(model, t)
            active = (model.task_outputs(probe, t)[0] != 0).any(0)  # what its masks leave on
            n = int(active.sum())
            a = torch.randn(n, n) / n ** 0.5
            on = active.nonzero().flatten()
            model.feature_active[t] = active
            model.feature_mean[t][:, on] = torch.randn(CLASSES_PER_TASK, n)
            model.feature_precision[t][on.unsqueeze(1), on] = a @ a.T + torch.eye(n)
            model.score_std[t] = 1.0 + torch.rand(model.score_std.shape[1])
    return model


def measure(network: str, num_tasks: int, reps: int, warmup: int, clock) -> dict:
    batch, chans, size = SETTINGS[network]
    x = torch.randn(batch, chans, size, size)
    maha = make_model(network, num_tasks, "mahalanobis")
    energy = make_model(network, num_tasks, "energy")
    looped = make_model(network, num_tasks, "mahalanobis")
    looped.batched = False
    fns = {
        "single": lambda: maha.task_outputs(x, 0),
        "batched": lambda: maha(x),
        "batched_energy": lambda: energy(x),
        "loop": lambda: looped(x),
    }
    times = {k: [] for k in fns}
    names = list(fns)
    with torch.no_grad():
        for name in names:  # first call: warm-up and the one-time check of the batched pass
            fns[name]()
        for rep in range(warmup + reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                start = clock()
                fns[name]()
                if rep >= warmup:
                    times[name].append(clock() - start)
    single = times["single"]
    row = {"network": network, "tasks": num_tasks, "batch": batch,
           "active_features": float(maha.feature_active[:num_tasks].float().mean()),
           "single_ms": 1000 * statistics.median(single)}
    for name in ("batched", "batched_energy", "loop"):
        row[f"{name}_ms"] = 1000 * statistics.median(times[name])
        row[f"{name}_ratio"] = statistics.median(t / s for t, s in zip(times[name], single))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--tasks", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process")
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock, "
          f"median of {args.reps} interleaved repetitions; ratios to one task's forward")
    header = (f"{'network':>14} {'T':>3} {'batch':>5} {'active':>6} {'single ms':>9} {'batched ms':>10} "
              f"{'ratio':>6} {'energy':>6} {'loop':>6}")
    print(header)
    for network in args.networks:
        for num_tasks in args.tasks:
            row = measure(network, num_tasks, args.reps, args.warmup, clock)
            rows.append(row)
            print(f"{network:>14} {num_tasks:>3} {row['batch']:>5} {row['active_features']:>6.0%} {row['single_ms']:>9.2f} "
                  f"{row['batched_ms']:>10.2f} {row['batched_ratio']:>6.2f} {row['batched_energy_ratio']:>6.2f} "
                  f"{row['loop_ratio']:>6.2f}", flush=True)
    print("active: share of the features a task sets; ratio: batched pass + Mahalanobis scoring + joint "
          "output; energy: same with the energy score; loop: T separate forwards + Mahalanobis scoring")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
                       "torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
                       "reps": args.reps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
