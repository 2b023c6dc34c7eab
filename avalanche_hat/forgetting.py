"""Selective forgetting (HAT-CL section 4.1.1): erase one task, leave every other bit-identical."""
from __future__ import annotations

from torch import nn

from .modules.base import HATModule, TaskIndexedModule
from .network import trained_tasks


def forget_task(module: nn.Module, task_id: int) -> dict[str, int]:
    """Forget ``task_id``: its mask is switched off, the units only it owned are re-initialised (free
    for later tasks), its copies of task-indexed layers are reset and it is no longer marked trained.

    Every other task computes exactly what it computed before: its units, weights and copies are
    not touched. The forgotten task's layers output zeros, so its head sees a constant input and
    predicts at chance. Returns the number of re-initialised parameters per layer name.
    """
    if task_id not in trained_tasks(module):
        raise ValueError(f"task {task_id} is not marked trained, so there is nothing to forget")
    counts: dict[str, int] = {}
    for name, m in module.named_modules():
        if isinstance(m, (HATModule, TaskIndexedModule)):
            counts[name] = m.forget(task_id)
    return counts
