"""Operations on a whole HAT network: which tasks are trained, regularisation, embedding clamps."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from . import guard
from .mechanism.regularization import global_usage_penalty, hatcl_usage_penalty, layerwise_usage_penalty
from .modules.base import MASK_RECORD, HATModule, TaskIndexedModule


def hat_modules(module: nn.Module) -> Iterator[tuple[str, HATModule]]:
    """``(name, layer)`` for every HAT layer in ``module``."""
    for name, m in module.named_modules():
        if isinstance(m, HATModule):
            yield name, m


def _require_hat(module: nn.Module) -> list[HATModule]:
    layers = [m for _, m in hat_modules(module)]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no HAT layers (HATLinear, HATConv2d, ...)")
    return layers


@torch.no_grad()
def mark_task_trained(module: nn.Module, task_id: int, trained: bool = True) -> None:
    """Record that ``task_id`` is learned: from now on what it owns is protected (Eq. 2 on the
    gradients, and restored after every optimizer step: its units' weights, its mask embedding, its
    copies of task-indexed layers).

    ``trained=False`` unmarks it: it is no longer protected, and its training steps no longer
    block training another task (what it learned may then be overwritten)."""
    layers = _require_hat(module)
    for layer in layers:
        layer.hat_config.check_task_id(task_id)
    for layer in layers:
        layer.hat_trained[task_id] = trained
        if not trained:
            layer.hat_stepped[task_id] = False
    if not trained:  # what it holds when it is marked again is taken then, not what it held before
        for m in module.modules():
            if isinstance(m, (HATModule, TaskIndexedModule)):
                g = guard.state(m)
                g.ref_tasks = g.ref_tasks - {task_id}
    _protect_now(module, layers)


def _protect_now(module: nn.Module, layers: list) -> None:
    """The guard's bookkeeping after the trained tasks changed: the task-indexed layers follow the
    network's HAT layers, and the reference of what the trained tasks own is taken now."""
    trained = guard.flag_set(layers[0], "hat_trained")
    for m in module.modules():
        if isinstance(m, (HATModule, TaskIndexedModule)):
            if isinstance(m, TaskIndexedModule):
                guard.link(m, layers[0])
            g = guard.state(m)
            g.step_tasks -= trained  # a step without a new forward protects them too
            guard.ensure_reference(m, guard.protected(m, guard.flag_set(m, "hat_trained")
                                                      if isinstance(m, HATModule) else trained))


def trained_tasks(module: nn.Module) -> list[int]:
    """The tasks recorded as trained (the same in every HAT layer of the network)."""
    layers = _require_hat(module)
    flags = layers[0].hat_trained
    for layer in layers[1:]:
        if not torch.equal(layer.hat_trained, flags):
            raise RuntimeError("HAT layers disagree on which tasks are trained: use mark_task_trained on the whole network")
    return flags.nonzero().flatten().tolist()


@torch.no_grad()
def clamp_embeddings_(module: nn.Module) -> None:
    """Clamp every mask embedding to ``[-c, c]`` (done in each training forward as well)."""
    for _, layer in hat_modules(module):
        layer.clamp_embedding_()


def hat_regularization(
    module: nn.Module,
    task_id: int,
    mask_scale: float | None,
    *,
    kind: str = "layerwise",
    quota: float | None = None,
    recorded: dict | None = None,
) -> torch.Tensor:
    """The mask-usage penalty of task ``task_id`` at ``mask_scale``.

    ``kind="layerwise"``: HAT-CL Eq. 5, per layer, over the units no other trained task owns, minus
    a quota (default ``1 / num_tasks``), clipped at 0, summed over layers. ``kind="global"``: the
    original HAT ratio over all layers together (no quota). ``kind="hatcl"``: exactly HAT-CL 0.1.1's
    ``get_hat_reg_term`` (the mean over layers, with a quota of ``N_l / num_tasks`` units;
    ``quota`` does not apply), so that a ported loop keeps HAT-CL's coefficient; see
    :func:`~avalanche_hat.mechanism.hatcl_usage_penalty`. Multiply by a coefficient yourself (the
    HATPlugin does).

    ``recorded``: what :func:`recorded_masks` collected during this step's forward; the layers found
    there reuse its masks and ownership instead of computing them again (same value, same gradient).
    """
    layers = _require_hat(module)
    pairs = []
    for layer in layers:
        seen = recorded.get(id(layer)) if recorded is not None else None
        if seen is not None and seen[0] == task_id and seen[1] == mask_scale:
            pairs.append(seen[2:])  # the mask and ownership this step's forward used
        else:
            pairs.append((layer.mask(task_id, mask_scale), layer.ownership(task_id)))
    if kind == "layerwise":
        if quota is None:
            quota = 1.0 / layers[0].hat_config.num_tasks
        return layerwise_usage_penalty(pairs, quota)
    if kind == "global":
        return global_usage_penalty(pairs)
    if kind == "hatcl":
        return hatcl_usage_penalty(pairs, layers[0].hat_config.num_tasks)
    raise ValueError(f"unknown regularisation kind {kind!r}: use 'layerwise' (HAT-CL Eq. 5 with a quota), "
                     "'global' (original HAT) or 'hatcl' (HAT-CL 0.1.1's get_hat_reg_term)")


@contextlib.contextmanager
def recorded_masks() -> Iterator[dict]:
    """Collect the soft mask and ownership each HAT layer computes in its training forward::

        with recorded_masks() as masks:
            out = model(HATPayload(x, task_id=t, mask_scale=s)).data
        loss = criterion(out, y) + c * hat_regularization(model, t, s, recorded=masks)

    Each layer's mask then serves both the forward and the regulariser: a layer's mask, ownership
    and compensated mask gradient are computed once per step instead of twice. Nothing outlives the
    block (a layer records only its first forward in it; forwards outside it record nothing).
    """
    record: dict = {}
    token = MASK_RECORD.set(record)
    try:
        yield record
    finally:
        MASK_RECORD.reset(token)


def hat_param_groups(module: nn.Module, embedding_lr: float | None = None) -> list[dict]:
    """Optimizer parameter groups with the mask embeddings on their own.

    With an adaptive optimizer (Adam and kin) an embedding moves about ``lr`` per step whatever
    its gradient, and masks train only while the scale is low (a few steps per epoch), so a dense
    initialisation may never switch a unit off at a weight learning rate such as 1e-3. Give the
    embeddings a larger one: ``Adam(hat_param_groups(model, embedding_lr=0.5), lr=1e-3)``.
    """
    embeddings = [layer.mask_embedding for _, layer in hat_modules(module)]
    ids = {id(p) for p in embeddings}
    rest = [p for p in module.parameters() if id(p) not in ids]
    group = {"params": embeddings}
    if embedding_lr is not None:
        group["lr"] = embedding_lr
    return [{"params": rest}, group]
