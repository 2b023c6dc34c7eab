"""What the HATPlugin adds to an Avalanche training step: HAT strategy vs Naive, same HAT network.

Usage:  python benchmarks/plugin_overhead.py [--model hat_resnet18s] [--batch 32] [--reps 12]
                                             [--iterations 8] [--threads 1] [--clock process]

Both strategies train the same HAT network (``HATMultiTaskModel`` around the timm model with
``num_classes=0``, one head per task), on task 1 after task 0 was learned with half of every layer's
units (so ownership and gradient nullification are active in both), with the same data (in-memory
tensors: no per-sample transforms), SGD and minibatch size:

- ``HAT``: the HATPlugin sets the mask scale each iteration (cosine schedule), adds the mask-usage
  penalty to the loss and masks are soft; (the optimizer reset and checks are once per experience).
- ``Naive``: Avalanche's plain strategy on the same model: binary masks, no penalty, no schedule
  (inside ``avalanche_hat.fixed_masks()``, the opt-in for training forwards with ``mask_scale=None``).

The step time is measured inside the strategy, from ``before_training_iteration`` to
``after_training_iteration`` (forward, loss, backward, optimizer step and every plugin callback in
between; data loading excluded), by a timing plugin placed first. Experiences alternate between the
two strategies (order swapped every repetition) so that load from other processes hits both alike.
Reported: median step time of each and the ratio HAT / Naive (median of the per-repetition ratios
of median step times). For context, Naive on the plain timm twin (no HAT layers) as well.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")

import timm  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

import avalanche_hat.timm_models  # noqa: E402,F401  (registers the models)
from avalanche_hat import HAT, HATConfig, HATMultiTaskModel, fixed_masks, mark_task_trained  # noqa: E402
from avalanche_hat.network import hat_modules  # noqa: E402
from avalanche_hat.timm_models import PLAIN_TWINS  # noqa: E402

CLOCKS = {"process": time.process_time, "wall": time.perf_counter}
NUM_TASKS, CLASSES = 5, 10


class StepTimer(SupervisedPlugin):
    """Time of each training iteration, callbacks included, data loading excluded."""

    def __init__(self, clock):
        super().__init__()
        self.clock, self.times, self._start = clock, [], None

    def before_training_iteration(self, strategy, **kwargs):
        self._start = self.clock()

    def after_training_iteration(self, strategy, **kwargs):
        self.times.append(self.clock() - self._start)


def tensor_stream(batch: int, iterations: int, channels: int, size: int):
    """Two in-memory task-incremental experiences of ``batch * iterations`` samples each."""
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset

    n = batch * iterations * 2
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % (2 * CLASSES)
    data = TensorDataset(torch.randn(n, channels, size, size, generator=g), y)
    data.targets = y.tolist()
    return nc_benchmark(data, data, n_experiences=2, task_labels=True, seed=0, class_ids_from_zero_in_each_exp=True)


def hat_model(name: str, channels: int) -> HATMultiTaskModel:
    """The HAT network with per-task heads, task 0 learned with a random half of every layer's units."""
    torch.manual_seed(0)
    net = timm.create_model(name, hat_config=HATConfig(num_tasks=NUM_TASKS), num_classes=0, in_chans=channels)
    model = HATMultiTaskModel(net, num_classes=CLASSES)
    with torch.no_grad():
        for _, layer in hat_modules(model):
            layer.mask_embedding[0].copy_(torch.randn_like(layer.mask_embedding[0]).sign())
    mark_task_trained(model, 0)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hat_resnet18s")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=8, help="training iterations per experience")
    parser.add_argument("--reps", type=int, default=12, help="experiences timed per strategy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process")
    parser.add_argument("--no-plain", action="store_true", help="skip Naive on the plain timm twin")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from avalanche_hat.mechanism import fused

    print(f"fused CPU kernels {'in use' if fused.build() else 'off'} (built before timing; AVALANCHE_HAT_FUSED=0 "
          "measures the PyTorch operations)")
    clock = CLOCKS[args.clock]
    stream = tensor_stream(args.batch, args.iterations, args.channels, args.size)
    experience = stream.train_stream[1]  # task 1
    kwargs = dict(train_mb_size=args.batch, train_epochs=1, evaluator=EvaluationPlugin(loggers=[]))

    timers = {}
    strategies = {}
    timers["HAT"] = StepTimer(clock)
    model = hat_model(args.model, args.channels)
    strategies["HAT"] = HAT(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                            plugins=[timers["HAT"]], allow_task_revisit=True, **kwargs)
    timers["Naive"] = StepTimer(clock)
    model = hat_model(args.model, args.channels)
    strategies["Naive"] = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                                plugins=[timers["Naive"]], **kwargs)
    if not args.no_plain:
        timers["Naive, plain twin"] = StepTimer(clock)
        torch.manual_seed(0)
        plain = timm.create_model(PLAIN_TWINS[args.model], num_classes=CLASSES, in_chans=args.channels)
        strategies["Naive, plain twin"] = Naive(model=plain, optimizer=torch.optim.SGD(plain.parameters(), lr=0.01),
                                                plugins=[timers["Naive, plain twin"]], **kwargs)

    names = list(strategies)

    def train(name):
        if name == "Naive":  # binary masks in training mode, on purpose: the network without the plugin
            with fixed_masks():
                strategies[name].train(experience)
        else:
            strategies[name].train(experience)

    for name in names:  # warm-up experience, not timed
        train(name)
        timers[name].times.clear()
    per_rep = {name: [] for name in names}
    for rep in range(args.reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            train(name)
            per_rep[name].append(statistics.median(timers[name].times))
            timers[name].times.clear()

    median_ms = {name: 1e3 * statistics.median(v) for name, v in per_rep.items()}
    ratio = statistics.median(h / n for h, n in zip(per_rep["HAT"], per_rep["Naive"]))
    result = {
        "model": args.model, "batch": args.batch, "input": [args.channels, args.size, args.size],
        "threads": args.threads, "clock": args.clock, "reps": args.reps, "iterations": args.iterations,
        "median_step_ms": median_ms, "hat_over_naive_same_network": ratio,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }
    if "Naive, plain twin" in per_rep:
        result["hat_over_naive_plain_twin"] = statistics.median(
            h / p for h, p in zip(per_rep["HAT"], per_rep["Naive, plain twin"]))
    print(f"{args.model}, batch {args.batch}, {args.channels}x{args.size}x{args.size}, CPU, "
          f"{args.threads} thread(s), {args.clock} time, {args.reps} experiences x {args.iterations} steps each")
    for name, ms in median_ms.items():
        print(f"  {name:<20} {ms:8.1f} ms / step")
    print(f"  plugin overhead: HAT / Naive (same HAT network) = {ratio:.3f}")
    if "hat_over_naive_plain_twin" in result:
        print(f"  HAT / Naive on the plain twin (layers + plugin) = {result['hat_over_naive_plain_twin']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
