"""Capacity: the share of each layer's units that each task uses (binary masks)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .network import hat_modules


@dataclass
class LayerCapacity:
    name: str
    units: int
    usage: dict[int, float]  # task -> share of the layer's units its binary mask keeps
    owned: float  # share of units used by at least one trained task
    shared: float  # share of units used by two or more trained tasks


@dataclass
class CapacityReport:
    tasks: list[int]
    layers: list[LayerCapacity] = field(default_factory=list)

    def usage(self, task_id: int) -> float:
        """Share of all masked units (unit-weighted over layers) that ``task_id`` uses."""
        if task_id not in self.tasks:
            raise KeyError(
                f"task {task_id!r} is not in this report (tasks {self.tasks}): "
                f"build it with capacity_report(model, tasks=[..., {task_id!r}])"
            )
        total = sum(layer.units for layer in self.layers)
        return sum(layer.usage[task_id] * layer.units for layer in self.layers) / total

    @property
    def owned(self) -> float:
        total = sum(layer.units for layer in self.layers)
        return sum(layer.owned * layer.units for layer in self.layers) / total

    @property
    def free(self) -> float:
        return 1.0 - self.owned

    def to_markdown(self) -> str:
        def row(cells):
            return "| " + " | ".join(str(c) for c in cells) + " |"

        tasks = [f"task {t}" for t in self.tasks]
        lines = [row(["layer", "units", *tasks, "owned", "shared"]), "|---|" + "---:|" * (len(tasks) + 3)]
        for layer in self.layers:
            usage = [f"{100 * layer.usage[t]:.1f}%" for t in self.tasks]
            lines.append(row([layer.name, layer.units, *usage, f"{100 * layer.owned:.1f}%", f"{100 * layer.shared:.1f}%"]))
        total = sum(layer.units for layer in self.layers)
        shared = sum(layer.shared * layer.units for layer in self.layers) / total
        usage = [f"{100 * self.usage(t):.1f}%" for t in self.tasks]
        lines.append(row(["**all**", total, *usage, f"{100 * self.owned:.1f}%", f"{100 * shared:.1f}%"]))
        return "\n".join(lines)

    __str__ = to_markdown


@torch.no_grad()
def capacity_report(module: nn.Module, tasks: list[int] | None = None) -> CapacityReport:
    """Per layer and per task, the share of units each task's binary mask keeps.

    ``tasks`` defaults to the trained ones; ``owned`` and ``shared`` always count trained tasks only.
    """
    layers = list(hat_modules(module))
    if not layers:
        raise ValueError(f"{type(module).__name__} has no HAT layers")
    trained = layers[0][1].hat_trained.nonzero().flatten().tolist()
    tasks = trained if tasks is None else list(tasks)
    for t in tasks:
        if t is None:
            raise TypeError("capacity_report takes task ids (ints); None (the plain network) has no masks")
        layers[0][1].hat_config.check_task_id(t)
    report = CapacityReport(tasks=tasks)
    for name, layer in layers:
        masks = (layer.mask_embedding > 0).float()
        used_by = masks[layer.hat_trained].sum(0) if trained else torch.zeros(layer.num_units)
        report.layers.append(
            LayerCapacity(
                name=name,
                units=layer.num_units,
                usage={t: masks[t].mean().item() for t in tasks},
                owned=(used_by > 0).float().mean().item(),
                shared=(used_by > 1).float().mean().item(),
            )
        )
    return report
