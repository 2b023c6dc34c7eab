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
