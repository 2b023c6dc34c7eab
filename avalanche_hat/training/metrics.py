"""The HAT capacity metric (share of units each task uses) for Avalanche's evaluation plugin and loggers."""
from __future__ import annotations

import csv
import os

from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.logging import CSVLogger

from ..capacity import CapacityReport, capacity_report
from ..network import trained_tasks
from .plugin import unwrap_model

PREFIX = "HATCapacity"


def capacity_metric_values(report: CapacityReport, per_layer: bool = True) -> dict[str, float]:
    """Metric names and values of a capacity report.

    ``HATCapacity/overall/Task000``: share of all masked units task 0 uses (binary masks,
    unit-weighted over layers); ``HATCapacity/overall/owned`` / ``free``: share used by at least one
    trained task / by none; with ``per_layer``, the same per layer as ``HATCapacity/layer/<name>/...``.
    """
    values = {f"{PREFIX}/overall/Task{t:03d}": report.usage(t) for t in report.tasks}
    values[f"{PREFIX}/overall/owned"] = report.owned
    values[f"{PREFIX}/overall/free"] = report.free
    if per_layer:
        for layer in report.layers:
            for t in report.tasks:
                values[f"{PREFIX}/layer/{layer.name}/Task{t:03d}"] = layer.usage[t]
            values[f"{PREFIX}/layer/{layer.name}/owned"] = layer.owned
            values[f"{PREFIX}/layer/{layer.name}/shared"] = layer.shared
    return values


class HATCapacityMetric(PluginMetric[dict]):
    """After each training experience: the share of units each learned task uses, overall and per
    layer (see :func:`capacity_metric_values` for the names). Interactive, Text, TensorBoard and
    WandB loggers show it as scalars; CSV needs :class:`HATCSVLogger` (Avalanche's CSVLogger writes
    accuracy, loss and forgetting only)."""

    def __init__(self, per_layer: bool = True) -> None:
        super().__init__()
        self.per_layer = per_layer
        self._last: dict[str, float] = {}

    def reset(self) -> None:
        self._last = {}

    def result(self) -> dict[str, float]:
        return dict(self._last)

    def after_training_exp(self, strategy) -> list[MetricValue]:
        model = unwrap_model(strategy.model)
        tasks = set(trained_tasks(model)) | set(strategy.experience.task_labels)
        report = capacity_report(model, tasks=sorted(tasks))
        self._last = capacity_metric_values(report, self.per_layer)
        x = strategy.clock.train_iterations
        return [MetricValue(self, name, value, x) for name, value in self._last.items()]

    def __str__(self) -> str:
        return PREFIX


def hat_capacity_metrics(per_layer: bool = True) -> list[PluginMetric]:
    """The capacity metric, in the list form of Avalanche's ``*_metrics()`` helpers."""
    return [HATCapacityMetric(per_layer=per_layer)]


class HATCSVLogger(CSVLogger):
    """Avalanche's ``CSVLogger`` (same ``training_results.csv`` and ``eval_results.csv``) that also
    writes every scalar metric whose name starts with one of ``prefixes`` to ``metrics_file``, one
    row per value: ``training_exp,metric,x_plot,value``.

    Avalanche's CSVLogger has fixed columns and drops every other metric; this subclass receives
    them through ``log_single_metric``, the call Avalanche makes on every logger for every value.
    """

    def __init__(self, log_folder=None, *, prefixes=(PREFIX,), metrics_file: str = "hat_capacity.csv") -> None:
        super().__init__(log_folder)
        self.prefixes = tuple(prefixes)
        self.metrics_path = os.path.join(self.log_folder, metrics_file)
        self.metrics_file = open(self.metrics_path, "w", newline="")
        self._writer = csv.writer(self.metrics_file)
        self._writer.writerow(["training_exp", "metric", "x_plot", "value"])
        self.metrics_file.flush()

    def log_single_metric(self, name, value, x_plot) -> None:
        if name.startswith(self.prefixes) and isinstance(value, (int, float)):
            self._writer.writerow([self.training_exp_id, name, x_plot, f"{float(value):.6f}"])
            self.metrics_file.flush()

    def close(self) -> None:
        super().close()
        self.metrics_file.close()

    def __getstate__(self):
        # Open files do not pickle (checkpoints): keep the path, reopen in append mode on load.
        state = self.__dict__.copy()
        for key in ("training_file", "eval_file", "metrics_file", "_writer"):
            state.pop(key, None)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self.training_file = open(os.path.join(self.log_folder, "training_results.csv"), "a")
        self.eval_file = open(os.path.join(self.log_folder, "eval_results.csv"), "a")
        self.metrics_file = open(self.metrics_path, "a", newline="")
        self._writer = csv.writer(self.metrics_file)
