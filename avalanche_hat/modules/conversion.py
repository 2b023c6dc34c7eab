"""Plain modules to HAT modules and back, and plain weights into a HAT network."""
from __future__ import annotations

import torch
from torch import nn

from ..config import HATConfig
from .base import TaskIndexedModule
from .conv import HATConv1d, HATConv2d, HATConv3d
from .linear import HATLinear
from .norm import (
    TaskIndexedBatchNorm1d,
    TaskIndexedBatchNorm2d,
    TaskIndexedBatchNorm3d,
    TaskIndexedGroupNorm,
    TaskIndexedLayerNorm,
    TaskIndexedLinear,
    TaskIndexedParameter,
)

BASE_TO_HAT = {
    nn.Linear: HATLinear,
    nn.Conv1d: HATConv1d,
    nn.Conv2d: HATConv2d,
    nn.Conv3d: HATConv3d,
    nn.BatchNorm1d: TaskIndexedBatchNorm1d,
    nn.BatchNorm2d: TaskIndexedBatchNorm2d,
    nn.BatchNorm3d: TaskIndexedBatchNorm3d,
    nn.LayerNorm: TaskIndexedLayerNorm,
    nn.GroupNorm: TaskIndexedGroupNorm,
}


def from_base_module(module: nn.Module, hat_config: HATConfig) -> nn.Module:
    """The HAT counterpart of a plain layer, with its weights (every task copy of a norm gets them)."""
    try:
        cls = BASE_TO_HAT[type(module)]
    except KeyError:
        raise TypeError(
            f"no HAT counterpart for {type(module).__name__}; supported: {', '.join(c.__name__ for c in BASE_TO_HAT)}"
        ) from None
    return cls.from_base_module(module, hat_config)


def load_plain_state_dict(hat_model: nn.Module, plain_state: dict, strict: bool = True):
    """Load the ``state_dict`` of the plain network into its HAT counterpart.

    HAT layers keep their plain names (``weight``, ``bias``); every copy of a task-indexed layer,
    the ``task_id=None`` copy included, receives the plain layer's state. Mask embeddings and the
    record of trained tasks keep their current values. With ``strict``, a plain key that finds no
    place, or a HAT weight that no plain key fills, is an error.
    """
    mapped: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    indexed = {name: m for name, m in hat_model.named_modules() if isinstance(m, TaskIndexedModule)}
    for name, m in indexed.items():
        prefix = f"{name}." if name else ""
        if isinstance(m, TaskIndexedParameter):
            if name in plain_state:
                mapped.update({f"{prefix}{k}": v for k, v in m.expand_plain_state(plain_state[name]).items()})
                consumed.add(name)
            continue
        own = {k[len(prefix):]: v for k, v in plain_state.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if own:
            mapped.update({f"{prefix}{k}": v for k, v in m.expand_plain_state(own).items()})
            consumed.update(f"{prefix}{k}" for k in own)
    for k, v in plain_state.items():
        if k not in consumed:
            mapped[k] = v
    result = hat_model.load_state_dict(mapped, strict=False)
    if strict:
        hat_only = ("mask_embedding", "hat_trained", "hat_stepped")
        missing = [k for k in result.missing_keys if not k.endswith(hat_only)]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                "plain weights do not match the HAT network: "
                f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                f"unexpected {result.unexpected_keys[:10]}{'...' if len(result.unexpected_keys) > 10 else ''}"
            )
    return result
