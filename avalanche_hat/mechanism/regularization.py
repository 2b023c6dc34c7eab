"""Mask-usage regularisation: how much of the free capacity the current task's masks take."""
from __future__ import annotations

import torch


def layerwise_usage_penalty(pairs, quota: float) -> torch.Tensor:
    """HAT-CL Eq. 5: ``sum_l max(sum_i a_i (1 - a_i^{<t}) / sum_i (1 - a_i^{<t}) - quota, 0)``.

    ``pairs`` holds ``(mask, owned)`` per layer; a layer with no free unit adds nothing."""
    total = None
    for mask, owned in pairs:
        free = 1.0 - owned
        available = free.sum()
        used = (mask * free).sum() / available.clamp_min(1.0)
        term = torch.where(available > 0, (used - quota).clamp_min(0.0), torch.zeros_like(used))
        total = term if total is None else total + term
    return total


def global_usage_penalty(pairs) -> torch.Tensor:
    """Original HAT: ``sum_l sum_i a_i (1 - a_i^{<t}) / sum_l sum_i (1 - a_i^{<t})`` over all layers."""
    used = sum((mask * (1.0 - owned)).sum() for mask, owned in pairs)
    available = sum((1.0 - owned).sum() for _, owned in pairs)
    return used / available.clamp_min(1.0)


def hatcl_usage_penalty(pairs, num_tasks: int) -> torch.Tensor:
    """HAT-CL 0.1.1's ``get_hat_reg_term(model, "uniform", task_id=t, mask_scale=s)``, from the
    same masks: the mean over layers (HAT-CL: over its maskers) of
    ``max(sum_i a_i (1 - a_i^{<t}) - N_l / T, 0) / sum_i (1 - a_i^{<t})``, where ``N_l`` is the
    layer's number of units and ``T`` the number of tasks (HAT-CL's quota, in units of the whole
    layer); a layer with no free unit adds 0 and still counts in the mean.

    Each layer's term is :func:`layerwise_usage_penalty`'s with the layer's own quota
    ``q_l = N_l / (T F_l)`` (``F_l`` its free units), so while nothing is owned (the first task)
    this is ``layerwise_usage_penalty(pairs, 1 / T) / L`` over ``L`` layers."""
    total, layers = None, 0
    for mask, owned in pairs:
        free = 1.0 - owned
        available = free.sum()
        over = ((mask * free).sum() - mask.numel() / num_tasks).clamp_min(0.0)
        term = torch.where(available > 0, over / available.clamp_min(1.0), torch.zeros_like(over))
        total = term if total is None else total + term
        layers += 1
    return total / layers
