"""Every task's binary-masked network in one batched pass (inference).

At inference, task ``t``'s network is the shared weights with task ``t``'s binary masks and task
``t``'s copy of every task-indexed layer (norms, heads, per-task parameters). So the ``T`` networks
differ only in a small per-task *state*: each HAT layer's mask embedding and each task-indexed
layer's copy. :func:`for_each_task` stacks that state over the tasks, puts task ``t``'s entry in the
slot of task 0, and runs the network once with ``task_id=0`` under ``torch.func.vmap`` over the
stack: every layer then runs as one batched kernel over the ``T`` tasks (a batched matmul, a
grouped convolution, a batch norm over stacked statistics), and a layer whose input does not depend
on the task (the first one) runs once for all of them. The core layers are used as they are; nothing
in them changes.

Cost (``benchmarks/task_inference_cost.py``, one CPU thread, ``benchmarks/results/task_inference_cost.json``):
the work is inherently about ``T`` times one task's forward, since every task's masks differ. The
batched pass beats ``T`` separate forwards on the leaderboard's MLP (first layer shared) and small
CNN, but not on a ResNet-18 at 32x32 on the CPU, where convolutions over ``T x B`` samples run slower
per sample than ``T`` convolutions over ``B`` and vmap adds layout copies around the batch norms:
there ``batched=False`` (``HATClassIncrementalModel.batched = False``) is the faster choice.

The contract: all per-task state lives in HAT layers (``mask_embedding``) and task-indexed modules
(``copies``), as in every network built from :mod:`avalanche_hat.modules` and
:mod:`avalanche_hat.timm_models`. A network keeping other per-task state (e.g. a plain
``nn.ModuleList`` of heads indexed by the task id) would give task 0's for every task:
:func:`batched_matches_loop` checks a network against ``T`` separate forwards.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..modules.base import HATModule, TaskIndexedModule

#: The task id every task's state is moved to inside the batched pass.
SLOT = 0


def task_slot_state(model: nn.Module, tasks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-task state of ``model`` stacked over ``tasks`` (first dimension), named as task 0's.

    HAT layers: ``<layer>.mask_embedding`` of shape ``(T, num_tasks, units)`` whose rows are all
    task ``t``'s embedding (a view, no copy: only the slot's row is read). Task-indexed modules:
    every parameter and buffer of ``copies.0`` stacked from ``copies.t``.
    """
    tasks = [int(t) for t in tasks]
    index = None
    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, HATModule):
            emb = module.mask_embedding
            for t in tasks:
                module.hat_config.check_task_id(t)
            if index is None or index.device != emb.device:
                index = torch.tensor(tasks, device=emb.device)
            state[prefix + "mask_embedding"] = emb[index].unsqueeze(1).expand(len(tasks), *emb.shape)
        elif isinstance(module, TaskIndexedModule):
            slot = module.copies[SLOT]
            copies = [module.task_copy(t) for t in tasks]
            if isinstance(slot, nn.Module):
                tensors = [dict([*c.named_parameters(), *c.named_buffers()]) for c in copies]
                for key, _ in [*slot.named_parameters(), *slot.named_buffers()]:
                    state[f"{prefix}copies.{SLOT}.{key}"] = torch.stack([t[key] for t in tensors])
            else:  # a ParameterList: the copies are tensors
                state[f"{prefix}copies.{SLOT}"] = torch.stack(list(copies))
    return state


class _Call(nn.Module):
    """Runs ``fn(SLOT)`` with ``model`` as a submodule, so ``functional_call`` can swap its state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[int], Any]):
        return fn(SLOT)


def for_each_task(model: nn.Module, fn: Callable[[int], Any], tasks: Sequence[int], *, batched: bool = True):
    """``fn(t)`` for every ``t`` in ``tasks``, stacked along a new first dimension (a tensor or a
    tuple of tensors).

    ``fn(task_id)`` runs ``model`` (in eval mode) for one task and returns tensors. ``batched=True``
    evaluates all tasks in one pass with ``torch.func.vmap`` (see the module docstring);
    ``batched=False`` calls ``fn`` once per task. Both give the same values up to floating-point
    rounding (the batched kernels sum in another order).
    """
    tasks = [int(t) for t in tasks]
    if not tasks:
        raise ValueError("for_each_task needs at least one task")
    if model.training:
        raise RuntimeError(
            "for_each_task evaluates the binary-masked networks of inference: call model.eval() first "
            "(in training mode batch norms would update their statistics)"
        )
    if not batched or len(tasks) == 1:
        return _stack([fn(t) for t in tasks])
    state = task_slot_state(model, tasks)
    call = _Call(model)
    named = {f"model.{k}": v for k, v in state.items()}
    return vmap(lambda s: functional_call(call, s, (fn,)))(named)


def _stack(outputs: list):
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(outputs)
    return type(first)(torch.stack(parts) for parts in zip(*outputs))


@torch.no_grad()
def batched_matches_loop(model: nn.Module, fn: Callable[[int], Any], tasks: Sequence[int],
                         rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Whether the batched pass gives what ``len(tasks)`` separate forwards give (within rounding)."""
    batched = for_each_task(model, fn, tasks, batched=True)
    looped = for_each_task(model, fn, tasks, batched=False)
    if isinstance(batched, torch.Tensor):
        batched, looped = (batched,), (looped,)
    return all(torch.allclose(b, l, rtol=rtol, atol=atol) for b, l in zip(batched, looped))
