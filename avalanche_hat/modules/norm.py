"""Task-indexed normalisation: one full copy of the norm per task (and one for ``task_id=None``).

They normalise the *unmasked* output of the HAT layer before them and apply its mask afterwards,
folded into their affine parameters (``(x - mu) / sigma * (gamma m) + beta m``): otherwise masked
units would come out as ``beta`` instead of 0, and the mask would cost a pass over the activations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HATConfig
from ..payload import HATPayload
from .base import TaskIndexedModule, as_payload


def _batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, weight, bias) -> torch.Tensor:
    """``bn(x)`` with the affine parameters replaced; running statistics updated as ``bn`` would."""
    bn._check_input_dim(x)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(
        x,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        weight,
        bias,
        use_batch_stats,
        momentum,
        bn.eps,
    )


class _TaskIndexedNorm(TaskIndexedModule):
    _base: type
    channel_axis: int  # axis a pending mask must lie on to be folded into the affine parameters

    def _norm(self, norm: nn.Module, x: torch.Tensor, weight, bias) -> torch.Tensor:
        raise NotImplementedError

    def _foldable(self, norm: nn.Module) -> bool:
        return True

    def forward(self, payload: HATPayload) -> HATPayload:
        payload = as_payload(self, payload)
        norm = self.copy_for(payload.task_id)
        x, mask = payload.unmasked_data, payload.pending_mask
        axis = self.channel_axis % x.ndim if x.ndim > 1 else 0
        if mask is None:
            # Without a pending mask a norm makes zero units non-zero (beta): ownership is lost.
            return payload.derive(norm(x))
        if payload.mask_dim == axis and self._foldable(norm):
            m = mask.to(x.dtype)
            weight = norm.weight * m if norm.weight is not None else m
            bias = norm.bias * m if norm.bias is not None else None
            return payload.derive(self._norm(norm, x, weight, bias), mask_dim=axis, ownership=payload.ownership)
        # The mask lies on another axis: normalise, keep the mask pending.
        return payload.derive(norm(x), mask=mask, mask_dim=payload.mask_dim, ownership=payload.ownership)

    @classmethod
    def from_base_module(cls, module: nn.Module, hat_config: HATConfig):
        """A task-indexed norm whose every copy (each task and ``task_id=None``) starts as ``module``."""
        new = cls._like(module, hat_config)
        for copy in new.copies:
            copy.load_state_dict(module.state_dict())
        return new

    def expand_plain_state(self, plain: dict) -> dict:
        """Map a plain norm's state (``weight``, ``running_mean``, ...) onto every copy."""
        return {f"copies.{i}.{k}": v for i in range(len(self.copies)) for k, v in plain.items()}


class _TaskIndexedBatchNorm(_TaskIndexedNorm):
    channel_axis = 1

    def __init__(self, num_features: int, hat_config: HATConfig, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(hat_config, HATConfig):
            raise TypeError(f"{type(self).__name__} needs a HATConfig, got {type(hat_config).__name__}")
        self.hat_config = hat_config
        self.num_features = num_features
        self.copies = nn.ModuleList(
            self._base(num_features, eps=eps, momentum=momentum, affine=affine,
                       track_running_stats=track_running_stats, device=device, dtype=dtype)
            for _ in range(hat_config.num_tasks + 1)
        )

    @classmethod
    def _like(cls, m, hat_config):
        return cls(m.num_features, hat_config, eps=m.eps, momentum=m.momentum, affine=m.affine,
                   track_running_stats=m.track_running_stats,
                   device=m.weight.device if m.weight is not None else None,
                   dtype=m.weight.dtype if m.weight is not None else None)

    def _norm(self, norm, x, weight, bias):
        return _batch_norm(norm, x, weight, bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_tasks={self.hat_config.num_tasks}"


class TaskIndexedBatchNorm1d(_TaskIndexedBatchNorm):
    """``nn.BatchNorm1d`` with one copy per task (and one for ``task_id=None``)."""
    _base = nn.BatchNorm1d


class TaskIndexedBatchNorm2d(_TaskIndexedBatchNorm):
    """``nn.BatchNorm2d`` with one copy per task (and one for ``task_id=None``)."""
    _base = nn.BatchNorm2d


class TaskIndexedBatchNorm3d(_TaskIndexedBatchNorm):
    """``nn.BatchNorm3d`` with one copy per task (and one for ``task_id=None``)."""
    _base = nn.BatchNorm3d


class TaskIndexedLayerNorm(_TaskIndexedNorm):
    """``nn.LayerNorm`` with one copy per task (and one for ``task_id=None``)."""

    _base = nn.LayerNorm
    channel_axis = -1

    def __init__(self, normalized_shape, hat_config: HATConfig, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(hat_config, HATConfig):
            raise TypeError(f"{type(self).__name__} needs a HATConfig, got {type(hat_config).__name__}")
        self.hat_config = hat_config
        self.copies = nn.ModuleList(
            nn.LayerNorm(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
            for _ in range(hat_config.num_tasks + 1)
        )
        self.normalized_shape = self.copies[0].normalized_shape

    @classmethod
    def _like(cls, m, hat_config):
        return cls(m.normalized_shape, hat_config, eps=m.eps, elementwise_affine=m.elementwise_affine,
                   bias=m.bias is not None,
                   device=m.weight.device if m.weight is not None else None,
                   dtype=m.weight.dtype if m.weight is not None else None)

    def _foldable(self, norm) -> bool:
        return len(norm.normalized_shape) == 1

    def _norm(self, norm, x, weight, bias):
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, num_tasks={self.hat_config.num_tasks}"


class TaskIndexedParameter(TaskIndexedModule):
    """A tensor with one independent copy per task (and one for ``task_id=None``), for per-task state
    such as a ViT's class token and position embedding. ``module(task_id)`` returns the copy."""

    def __init__(self, shape, hat_config: HATConfig, init_std: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.hat_config = hat_config
        self.init_std = float(init_std)
        self.copies = nn.ParameterList(
            nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)) for _ in range(hat_config.num_tasks + 1)
        )
        for p in self.copies:
            self._reset(p)

    @torch.no_grad()
    def _reset(self, p: torch.Tensor) -> None:
        """Zeros, or a normal with ``init_std`` truncated at two standard deviations."""
        if self.init_std > 0:
            nn.init.trunc_normal_(p, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)
        else:
            p.zero_()

    def forward(self, task_id: int | None) -> torch.Tensor:
        return self.copies[self.copy_index(task_id)]

    @torch.no_grad()
    def forget(self, task_id: int) -> int:
        p = self.copies[self.copy_index(task_id)]
        self._reset(p)
        return p.numel()

    def expand_plain_state(self, plain: torch.Tensor) -> dict:
        return {f"copies.{i}": plain.clone() for i in range(len(self.copies))}


class TaskIndexedLinear(TaskIndexedModule):
    """One ``nn.Linear`` per task (and one for ``task_id=None``): the per-task classifier heads of
    task-incremental learning. Takes a payload (or a tensor with ``task_id``), returns a tensor."""

    def __init__(self, in_features: int, out_features: int, hat_config: HATConfig, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(hat_config, HATConfig):
            raise TypeError(f"{type(self).__name__} needs a HATConfig, got {type(hat_config).__name__}")
        self.hat_config = hat_config
        self.in_features, self.out_features = in_features, out_features
        self.copies = nn.ModuleList(
            nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
            for _ in range(hat_config.num_tasks + 1)
        )

    def forward(self, x, task_id: int | None = None) -> torch.Tensor:
        if isinstance(x, HATPayload):
            task_id, x = x.task_id, x.data
        return self.copy_for(task_id)(x)

    @classmethod
    def from_base_module(cls, module: nn.Linear, hat_config: HATConfig) -> "TaskIndexedLinear":
        new = cls(module.in_features, module.out_features, hat_config, bias=module.bias is not None,
                  device=module.weight.device, dtype=module.weight.dtype)
        for copy in new.copies:
            copy.load_state_dict(module.state_dict())
        return new

    def expand_plain_state(self, plain: dict) -> dict:
        return {f"copies.{i}.{k}": v for i in range(len(self.copies)) for k, v in plain.items()}

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, num_tasks={self.hat_config.num_tasks}"
