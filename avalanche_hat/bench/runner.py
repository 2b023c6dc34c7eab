"""Train one method on one benchmark and measure it: accuracy matrix, time, parameters, memory."""
from __future__ import annotations

import math
import os
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .networks import count_parameters
from .strategies import BUILDERS, HyperParameters, TrainSettings


@dataclass
class MethodResult:
    method: str
    seed: int
    matrix: list[list[float]]  # matrix[i][j]: accuracy on task j after training task i (joint: one row)
    train_seconds: float
    parameters: int
    peak_memory_mb: float
    memory_kind: str
    config: dict
    capacity: dict | None = None  # HAT: per-task share of units and the capacity table
    task_inference: dict | None = None  # class-incremental HAT: task-id prediction per score, TIL accuracy
    # Per task learned (index i: the i-th experience; joint training: one entry): seconds of
    # ``strategy.train``, its training steps, the peak memory so far (same measure as
    # ``peak_memory_mb``) and, for HAT, the share of all HAT units some task owns after it.
    task_seconds: list[float] = field(default_factory=list)
    task_steps: list[int] = field(default_factory=list)
    task_peak_memory_mb: list[float] = field(default_factory=list)
    owned_after_task: list[float] | None = None
    model: object = field(default=None, repr=False)

    @property
    def seconds_per_step(self) -> list[float]:
        """Train time per training step of each task (the cost of one step as tasks accumulate)."""
        return [sec / max(n, 1) for sec, n in zip(self.task_seconds, self.task_steps)]

    @property
    def mean_seen(self) -> list[float]:
        """After each task i: mean accuracy over tasks 0..i (the tasks seen so far)."""
        return [float(np.mean(row[:i + 1])) for i, row in enumerate(self.matrix)]

    @property
    def final(self) -> list[float]:
        return self.matrix[-1]

    @property
    def acc(self) -> float:
        return float(np.mean(self.final))

    @property
    def bwt(self) -> float:
        """Mean over tasks 0..T-2 of (final accuracy - accuracy right after learning it). NaN for
        joint training, which has no 'right after'."""
        if len(self.matrix) < 2:
            return math.nan
        t = len(self.matrix)
        return float(np.mean([self.matrix[-1][j] - self.matrix[j][j] for j in range(t - 1)]))

    @property
    def forgetting(self) -> float:
        """Mean over tasks 0..T-2 of (best accuracy before the last task - final accuracy)."""
        if len(self.matrix) < 2:
            return math.nan
        t = len(self.matrix)
        return float(np.mean([max(self.matrix[i][j] for i in range(j, t - 1)) - self.matrix[-1][j]
                              for j in range(t - 1)]))

    @classmethod
    def from_dict(cls, d: dict) -> "MethodResult":
        """Back from :meth:`to_dict` (the ``runs`` of a leaderboard JSON)."""
        matrix = [[math.nan if v is None else v for v in row] for row in d["accuracy_matrix"]]
        return cls(method=d["method"], seed=d["seed"], matrix=matrix, train_seconds=d["train_seconds"],
                   parameters=d["parameters"], peak_memory_mb=d["peak_memory_mb"], memory_kind=d["memory_kind"],
                   config=d["config"], capacity=d.get("capacity"), task_inference=d.get("task_inference"),
                   task_seconds=d.get("task_seconds", []), task_steps=d.get("task_steps", []),
                   task_peak_memory_mb=d.get("task_peak_memory_mb", []), owned_after_task=d.get("owned_after_task"))

    def to_dict(self) -> dict:
        return {
            "method": self.method, "seed": self.seed, "acc": self.acc, "bwt": self.bwt,
            "forgetting": self.forgetting, "train_seconds": self.train_seconds, "parameters": self.parameters,
            "peak_memory_mb": self.peak_memory_mb, "memory_kind": self.memory_kind,
            "accuracy_matrix": self.matrix, "config": self.config, "capacity": self.capacity,
            "task_inference": self.task_inference, "task_seconds": self.task_seconds, "task_steps": self.task_steps,
            "task_peak_memory_mb": self.task_peak_memory_mb, "owned_after_task": self.owned_after_task,
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PeakMemory:
    """Peak memory while a block runs. CUDA: ``torch.cuda.max_memory_allocated`` (tensors only).
    CPU: the process's resident set size sampled every 10 ms by a thread (psutil), minus the RSS at
    the start: torch's CPU allocations are invisible to tracemalloc, and ``ru_maxrss`` never goes
    down, so it cannot separate methods run one after another in one process."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.kind = "CUDA max_memory_allocated" if self.cuda else "CPU RSS increase (psutil, 10 ms sampling)"
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            try:
                import psutil
            except ImportError:  # no sampler: the process's peak so far (it never goes down)
                import resource

                self.kind = "CPU peak RSS increase (ru_maxrss; psutil not installed)"
                self._maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                self._base = self._maxrss()
                return self
            self._maxrss = None
            self._proc = psutil.Process(os.getpid())
            self._base = self._proc.memory_info().rss
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._max = max(self._max, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self._maxrss is not None:
            self.peak_bytes = self._maxrss() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._proc.memory_info().rss)
            self.peak_bytes = self._max - self._base
        return False

    @property
    def megabytes(self) -> float:
        return self.peak_bytes / 2 ** 20

    def so_far_mb(self) -> float:
        """The peak up to now, while the block runs (MB, same measure as :attr:`megabytes`)."""
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2 ** 20
        if self._maxrss is not None:
            return (self._maxrss() - self._base) / 2 ** 20
        self._max = max(self._max, self._proc.memory_info().rss)
        return (self._max - self._base) / 2 ** 20


def _progress_plugin(bar, steps: list[int]):
    """Advances the bar and counts the training steps (``steps[0]``)."""
    from avalanche.core import SupervisedPlugin

    class Progress(SupervisedPlugin, supports_distributed=True):
        def after_training_iteration(self, strategy, **kwargs):
            bar.update(1)
            steps[0] += 1

    return Progress()


def _evaluator():
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])


def _accuracy_row(metrics: dict, num_tasks: int, seen: int | None = None) -> list[float]:
    """Per-experience accuracies from Avalanche's ``Top1_Acc_Exp/eval_phase/test_stream/TaskXXX/ExpXXX``;
    with ``seen``, only experiences ``0..seen-1`` were evaluated (the others stay NaN)."""
    row = [math.nan] * num_tasks
    for key, value in metrics.items():
        if key.startswith("Top1_Acc_Exp/eval_phase/test_stream/"):
            exp = int(key.rsplit("/Exp", 1)[1])
            if seen is None or exp < seen:
                row[exp] = float(value)
    if any(math.isnan(v) for v in row[:seen]):
        raise RuntimeError(f"evaluation did not report every experience: {row}")
    return row


def run_method(method: str, scenario, settings: TrainSettings, hp: HyperParameters, seed: int,
               progress: bool = True, keep_model: bool = False) -> MethodResult:
    """Train ``method`` on the scenario's train stream, evaluating the whole test stream after each
    experience (joint training: once, after training on everything)."""
    from tqdm.auto import tqdm

    from avalanche_hat.training import get_world_size

    seed_everything(seed)
    num_tasks = len(scenario.train_stream)
    shard = lambda n: math.ceil(n / get_world_size())  # noqa: E731  (samples per process under torchrun)
    batches = sum(math.ceil(shard(len(e.dataset)) / settings.batch_size) for e in scenario.train_stream)
    total = batches * settings.epochs
    bar = tqdm(total=total, desc=f"{method:>13} seed {seed}", unit="batch", disable=not progress,
               leave=False, dynamic_ncols=True)
    steps = [0]
    built = BUILDERS[method](settings, hp, [_progress_plugin(bar, steps)], _evaluator())
    strategy, model = built.strategy, built.model
    params = count_parameters(model)
    matrix: list[list[float]] = []
    task_seconds, task_steps, task_memory, owned = [], [], [], []
    with PeakMemory(settings.device) as memory:
        if method == "JointTraining":
            experiences = [scenario.train_stream]
        else:
            experiences = list(scenario.train_stream)
        for i, exp in enumerate(experiences):
            steps[0] = 0
            start = time.perf_counter()
            strategy.train(exp)
            task_seconds.append(time.perf_counter() - start)
            task_steps.append(steps[0])
            task_memory.append(memory.so_far_mb())
            if method == "JointTraining" or not settings.eval_seen_only:
                matrix.append(_accuracy_row(strategy.eval(scenario.test_stream), num_tasks))
            else:  # the tasks learned so far; later tasks' heads are untrained (NaN in the matrix)
                matrix.append(_accuracy_row(strategy.eval(scenario.test_stream[:i + 1]), num_tasks, seen=i + 1))
            if method == "HAT":
                from avalanche_hat import capacity_report

                owned.append(capacity_report(model).owned)
    train_seconds = sum(task_seconds)
    bar.close()
    capacity = None
    if method == "HAT":
        from avalanche_hat import capacity_report

        report = capacity_report(model)
        capacity = {"usage": {str(t): report.usage(t) for t in report.tasks}, "owned": report.owned,
                    "table": report.to_markdown(),
                    "layers": [{"name": l.name, "units": l.units, "usage": {str(t): u for t, u in l.usage.items()},
                                "owned": l.owned, "shared": l.shared} for l in report.layers]}
    task_inference = None
    if method == "HAT" and settings.class_incremental:
        task_inference = hat_task_inference(model, scenario.test_stream, settings)
    return MethodResult(method=method, seed=seed, matrix=matrix, train_seconds=train_seconds, parameters=params,
                        peak_memory_mb=memory.megabytes, memory_kind=memory.kind, config=built.config,
                        capacity=capacity, task_inference=task_inference, task_seconds=task_seconds,
                        task_steps=task_steps, task_peak_memory_mb=task_memory,
                        owned_after_task=owned or None, model=model if keep_model else None)


def hat_task_inference(model, test_stream, settings: TrainSettings) -> dict:
    """Class-incremental HAT after the last task, on the whole evaluation stream: task-id prediction
    accuracy and class-incremental accuracy of every task score (calibrated and raw), the accuracy
    with the task ids given (task-incremental evaluation of the same model), and the measured cost of
    inference: the batched pass over all tasks against one task's forward (CPU time, medians)."""
    import statistics

    from torch.utils.data import ConcatDataset, DataLoader

    from avalanche_hat.training import evaluate_task_inference

    model.eval()
    device = torch.device(settings.device)
    data = [e.dataset.eval() for e in test_stream]
    report = evaluate_task_inference(model, DataLoader(ConcatDataset(data), batch_size=settings.eval_batch_size))
    hits = total = 0
    with torch.no_grad():
        for e, d in zip(test_stream, data):
            for x, y, *_ in DataLoader(d, batch_size=settings.eval_batch_size):
                x, y = x.to(device), y.to(device)
                hits += int((model.forward_task(x, e.current_experience).argmax(1) == y).sum())
                total += len(y)
        report["task_incremental_accuracy"] = hits / total
        x = next(iter(DataLoader(data[0], batch_size=settings.eval_batch_size)))[0].to(device)
        single, batched = [], []
        clock = time.process_time if device.type == "cpu" else time.perf_counter
        for _ in range(7):
            for fn, times in ((lambda: model.task_outputs(x, 0), single), (lambda: model(x), batched)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = clock()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(clock() - start)
    report["cost"] = {"tasks": len(model.inference_tasks()), "batch": len(x),
                      "single_task_forward_ms": 1000 * statistics.median(single[1:]),
                      "task_inference_ms": 1000 * statistics.median(batched[1:]),
                      "ratio": statistics.median(b / s for b, s in zip(batched[1:], single[1:]))}
    report["task_score"] = model.task_score
    return report
