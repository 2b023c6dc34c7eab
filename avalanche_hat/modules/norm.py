"""Task-indexed normalisation: one full copy of the norm per task (and one for ``task_id=None``).

Where the mask of the HAT layer before them goes (``m``: the pending mask of Eq. 1, ``h``: the
layer's unmasked output, ``gamma``/``beta``: the copy's affine parameters):

* The norm's statistics reduce over the mask's unit axis (a LayerNorm over the features of a
  ``HATLinear`` or over (C, H, W) of a ``HATConv2d``, a GroupNorm over a group of channels, a
  BatchNorm1d over the positions a ``HATLinear`` masks): it normalises the masked output ``m h``,
  so the units the task does not use enter the mean and the variance as exact zeros, which no later
  task can change (their ``h`` can). That is what ``norm(m * h)`` computes, so a task exported as a
  plain network (mask folded into the weights) gives the same numbers. Where the affine parameters
  lie along the mask's axis, the mask is folded into them again (``norm(m h) (gamma m) + beta m``),
  so switched-off units stay exactly 0 and their ownership carries on to the next HAT layer;
  otherwise the mask stays pending and is applied later.
* The statistics are per unit along the mask's axis (BatchNorm over the channels a HAT convolution
  masks, a LayerNorm over (H, W)): each unit's statistics come from that unit alone, and the mask
  scales them away, so the norm normalises ``h`` unmasked (one pass fewer) and folds the mask into
  its affine parameters (``(h - mu) / sigma (gamma m) + beta m``) or keeps it pending.
* No pending mask (after GELU, a residual add, a position embedding, or on the network's input):
  every unit is either an exact zero for the task or computed from what the task owns, and the
  norm runs as it is.
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
    """The forward shared by the task-indexed norms; subclasses say which axes their statistics
    reduce over and along which axes their affine parameters lie (see the module docstring)."""

    _base: type

    def _norm(self, norm: nn.Module, x: torch.Tensor, weight, bias) -> torch.Tensor:
        """``norm(x)`` with ``weight`` and ``bias`` in place of the copy's affine parameters."""
        raise NotImplementedError

    def _reduced_axes(self, norm: nn.Module, ndim: int) -> range | tuple:
        """Axes of an ``ndim``-d input that the statistics of one normalised value reduce over."""
        raise NotImplementedError

    def _affine_axes(self, norm: nn.Module, ndim: int) -> range | tuple:
        """Axes of an ``ndim``-d input along which the affine parameters lie (in their order)."""
        raise NotImplementedError

    def _affine_shape(self, norm: nn.Module) -> tuple:
        raise NotImplementedError

    def forward(self, payload: HATPayload) -> HATPayload:
        payload = as_payload(self, payload)
        norm = self.copy_for(payload.task_id)
        mask = payload.pending_mask
        if mask is None:
            # Every unit is an exact zero for this task or computed from what it owns.
            return payload.derive(norm(payload.unmasked_data))
        x, axis = payload.unmasked_data, payload.mask_dim
        if axis in self._reduced_axes(norm, x.ndim):
            # Statistics across units: the units the task does not use must enter them as exact
            # zeros, not as the values later tasks train.
            x = payload.data
        affine = tuple(self._affine_axes(norm, x.ndim))
        if axis not in affine:  # the affine parameters cannot carry the mask: it stays pending
            return payload.derive(norm(x), mask=mask, mask_dim=axis, ownership=payload.ownership)
        shape = [1] * len(affine)
        shape[affine.index(axis)] = -1
        m = mask.to(x.dtype).view(shape)
        weight = norm.weight * m if norm.weight is not None else m.expand(self._affine_shape(norm)).contiguous()
        bias = norm.bias * m if norm.bias is not None else None
        return payload.derive(self._norm(norm, x, weight, bias), mask_dim=axis, ownership=payload.ownership)

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


def _check_config(module: nn.Module, hat_config) -> None:
    if not isinstance(hat_config, HATConfig):
        raise TypeError(f"{type(module).__name__} needs a HATConfig, got {type(hat_config).__name__}")


class _TaskIndexedBatchNorm(_TaskIndexedNorm):
    def __init__(self, num_features: int, hat_config: HATConfig, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        _check_config(self, hat_config)
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

    def _reduced_axes(self, norm, ndim):
        return tuple(a for a in range(ndim) if a != 1)  # the batch and every position, per channel

    def _affine_axes(self, norm, ndim):
        return (1,)

    def _affine_shape(self, norm):
        return (norm.num_features,)

    def _norm(self, norm, x, weight, bias):
        return _batch_norm(norm, x, weight, bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_tasks={self.hat_config.num_tasks}"


class TaskIndexedBatchNorm1d(_TaskIndexedBatchNorm):
    """``nn.BatchNorm1d`` with one copy per task (and one for ``task_id=None``).

    On ``(N, C)`` or ``(N, C, L)`` with the mask on ``C`` (a HAT layer's units) the statistics are
    per unit and the mask folds into the affine parameters; with the mask on ``L`` (a ``HATLinear``
    applied to ``(N, C, L)``) the statistics over ``L`` take the masked output."""
    _base = nn.BatchNorm1d


class TaskIndexedBatchNorm2d(_TaskIndexedBatchNorm):
    """``nn.BatchNorm2d`` with one copy per task (and one for ``task_id=None``); after a
    ``HATConv2d`` its statistics are per channel and the mask folds into its affine parameters."""
    _base = nn.BatchNorm2d


class TaskIndexedBatchNorm3d(_TaskIndexedBatchNorm):
    """``nn.BatchNorm3d`` with one copy per task (and one for ``task_id=None``)."""
    _base = nn.BatchNorm3d


class TaskIndexedLayerNorm(_TaskIndexedNorm):
    """``nn.LayerNorm`` with one copy per task (and one for ``task_id=None``).

    When the normalised shape includes the mask's axis (the features of a ``HATLinear``, (C, H, W)
    of a ``HATConv2d``), the statistics take the masked output, whose switched-off units are exact
    zeros, and the mask folds into the affine parameters after it; otherwise (a LayerNorm over
    (H, W) after a convolution) the statistics are per unit and the mask stays pending."""

    _base = nn.LayerNorm

    def __init__(self, normalized_shape, hat_config: HATConfig, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        _check_config(self, hat_config)
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

    def _reduced_axes(self, norm, ndim):
        return range(ndim - len(norm.normalized_shape), ndim)

    _affine_axes = _reduced_axes

    def _affine_shape(self, norm):
        return tuple(norm.normalized_shape)

    def _norm(self, norm, x, weight, bias):
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, num_tasks={self.hat_config.num_tasks}"


class TaskIndexedGroupNorm(_TaskIndexedNorm):
    """``nn.GroupNorm`` with one copy per task (and one for ``task_id=None``).

    Its statistics reduce over a group of channels and every position, so they take the masked
    output (switched-off channels and positions are exact zeros); with the mask on the channels (a
    HAT convolution before it) the mask folds into the per-channel affine parameters after it."""

    _base = nn.GroupNorm

    def __init__(self, num_groups: int, num_channels: int, hat_config: HATConfig, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None):
        super().__init__()
        _check_config(self, hat_config)
        self.hat_config = hat_config
        self.num_groups, self.num_channels = num_groups, num_channels
        self.copies = nn.ModuleList(
            nn.GroupNorm(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
            for _ in range(hat_config.num_tasks + 1)
        )

    @classmethod
    def _like(cls, m, hat_config):
        return cls(m.num_groups, m.num_channels, hat_config, eps=m.eps, affine=m.affine,
                   device=m.weight.device if m.weight is not None else None,
                   dtype=m.weight.dtype if m.weight is not None else None)

    def _reduced_axes(self, norm, ndim):
        return range(1, ndim)

    def _affine_axes(self, norm, ndim):
        return (1,)

    def _affine_shape(self, norm):
        return (norm.num_channels,)

    def _norm(self, norm, x, weight, bias):
        return F.group_norm(x, norm.num_groups, weight, bias, norm.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, num_tasks={self.hat_config.num_tasks}"


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
    def forget(self, task_id: int, dry_run: bool = False) -> int:
        p = self.copies[self.copy_index(task_id)]
        if not dry_run:
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
