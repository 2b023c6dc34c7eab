"""Selective forgetting (HAT-CL section 4.1.1): erase one task, leave every other bit-identical, and
leave the erased task id ready to be learned again."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .modules.base import HATModule, TaskIndexedModule
from .network import trained_tasks

__all__ = ["forget_task", "ForgetResult", "LayerForgetting"]


@dataclass(frozen=True)
class LayerForgetting:
    """What forgetting a task does to one layer.

    Attributes:
        kind: ``"hat"`` (a HAT layer) or ``"task-indexed"`` (a layer with one copy per task).
        reinitialized: weight and bias entries re-initialised (the value of the layer in
            :class:`ForgetResult`): the rows of the units only the task used, or the task's whole copy.
        units_freed: HAT layers: units only the task used, now free for other tasks (0 otherwise).
        units: HAT layers: the layer's units (0 otherwise).
        parameters: per parameter, relative to the layer, ``(entries re-initialised, entries)``
            (HAT-CL's ``ForgetResult`` pairs); a HAT layer's ``mask_embedding`` counts the task's row.
    """

    kind: str
    reinitialized: int
    units_freed: int = 0
    units: int = 0
    parameters: dict = field(default_factory=dict)


class ForgetResult(dict):
    """The result of :func:`forget_task`: a ``dict`` from layer name to the number of weight and
    bias entries re-initialised there (what ``forget_task`` always returned), with the details.

    Attributes:
        task_id: the task forgotten (or that would be, with ``dry_run``).
        dry_run: True when nothing was changed.
        layers: per layer name, a :class:`LayerForgetting`.
    """

    def __init__(self, task_id: int, dry_run: bool, layers: dict[str, LayerForgetting]):
        super().__init__((name, layer.reinitialized) for name, layer in layers.items())
        self.task_id = task_id
        self.dry_run = dry_run
        self.layers = dict(layers)

    @property
    def total(self) -> int:
        """Weight and bias entries re-initialised in the whole network."""
        return sum(self.values())

    @property
    def units_freed(self) -> int:
        """Units of HAT layers that only the task used, now free for other tasks."""
        return sum(layer.units_freed for layer in self.layers.values())

    @property
    def parameters(self) -> dict[str, tuple[int, int]]:
        """``{full parameter name: (entries re-initialised, entries)}``, as HAT-CL's ``ForgetResult``
        reports it (``"fc1.weight"``, ``"head.copies.0.bias"``, ``"fc1.mask_embedding"``)."""
        return {f"{name}.{p}" if name else p: counts
                for name, layer in self.layers.items() for p, counts in layer.parameters.items()}

    def num_forgotten(self, keyword: str) -> tuple[int, int]:
        """``(entries re-initialised, entries)`` summed over the parameters whose dotted name has
        ``keyword`` as one of its parts (``"weight"``, ``"fc1"``), or of the parameter so named
        (HAT-CL's ``get_num_forgotten``). Raises ``KeyError`` when no parameter matches."""
        params = self.parameters
        if keyword in params:
            return params[keyword]
        matches = [c for name, c in params.items() if keyword in name.split(".")]
        if not matches:
            raise KeyError(f"no parameter named {keyword!r} or with {keyword!r} in its name: "
                           f"{sorted(params)}")
        return sum(f for f, _ in matches), sum(t for _, t in matches)

    def __repr__(self) -> str:
        what = "would re-initialise" if self.dry_run else "re-initialised"
        return (f"ForgetResult(task {self.task_id}: {what} {self.total} weight/bias entries in "
                f"{len(self)} layers, {self.units_freed} units freed; {dict(self)})")

    def __reduce__(self):
        return (ForgetResult, (self.task_id, self.dry_run, self.layers))

    def to_markdown(self) -> str:
        """One row per layer: kind, units freed of units, entries re-initialised per parameter."""
        head = "would be re-initialised" if self.dry_run else "re-initialised"
        rows = [f"| layer | kind | units freed | {head} |", "|---|---|---:|---|"]
        for name, layer in self.layers.items():
            units = f"{layer.units_freed} / {layer.units}" if layer.kind == "hat" else ""
            params = ", ".join(f"{p} {f}/{t}" for p, (f, t) in layer.parameters.items())
            rows.append(f"| {name or '(root)'} | {layer.kind} | {units} | {params} |")
        return "\n".join(rows)


def _hat_layer(layer: HATModule, task_id: int, dry_run: bool) -> LayerForgetting:
    units = layer.num_units
    freed = int(layer.forgettable_units(task_id).numel())
    parameters = {}
    for name in ("weight", "bias"):
        p = getattr(layer, name, None)
        if p is not None:
            parameters[name] = (freed * (p[0].numel() if p.ndim > 1 else 1), p.numel())
    parameters["mask_embedding"] = (units, layer.mask_embedding.numel())
    reinitialized = layer.forget(task_id, dry_run=dry_run)
    return LayerForgetting("hat", reinitialized, freed, units, parameters)


def _task_indexed_layer(layer: TaskIndexedModule, task_id: int, dry_run: bool) -> LayerForgetting:
    index = layer.task_index(task_id)  # a look-up, not a forward
    parameters = {name: (p.numel(), p.numel()) for name, p in layer.named_parameters()
                  if name.split(".")[:2] == ["copies", str(index)]}
    reinitialized = layer.forget(task_id, dry_run=dry_run)
    return LayerForgetting("task-indexed", reinitialized, parameters=parameters)


def forget_task(module: nn.Module, task_id: int, *, dry_run: bool = False) -> ForgetResult:
    """Forget ``task_id`` and leave its id ready to be learned again.

    In every HAT layer, the units only ``task_id`` uses (no other trained task has them on) get
    freshly initialised weights and biases and become free for later tasks; ``task_id``'s mask
    embeddings are re-initialised as a fresh task's are (``HATConfig.mask_init``); it is no longer
    marked trained. Its copies of task-indexed layers (heads, norms with their running statistics,
    per-task tensors) are reset, and modules with other per-task records (``forget_task_state``,
    e.g. a class-incremental model's classes and calibration) drop them. Training ``task_id``
    again then starts as a task never trained would.

    Every other task computes exactly what it computed before (``torch.equal``): its units, weights,
    embeddings and copies are not touched.

    Args:
        module: the network.
        task_id: a trained task.
        dry_run: report what would be re-initialised and change nothing at all (no parameter,
            buffer or random number generator state).

    Returns:
        A :class:`ForgetResult`: per layer name, the weight and bias entries re-initialised (a
        ``dict``, as before), with per-layer details, totals and HAT-CL's per-parameter counts.
    """
    if task_id not in trained_tasks(module):
        raise ValueError(f"task {task_id} is not marked trained, so there is nothing to forget")
    layers: dict[str, LayerForgetting] = {}
    stateful, copies_seen = [], set()
    for name, m in module.named_modules():  # each layer's plan reads only that layer's own state
        if isinstance(m, HATModule):
            layers[name] = _hat_layer(m, task_id, dry_run)
        elif isinstance(m, TaskIndexedModule) and id(m.copies) not in copies_seen:
            copies_seen.add(id(m.copies))  # a wrapper sharing its inner layer's copies counts once
            layers[name] = _task_indexed_layer(m, task_id, dry_run)
        if callable(getattr(m, "forget_task_state", None)):
            stateful.append(m)
    if not dry_run:
        for m in stateful:
            m.forget_task_state(task_id)
    return ForgetResult(task_id, dry_run, layers)
