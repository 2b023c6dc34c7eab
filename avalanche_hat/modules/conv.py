"""HATConv1d/2d/3d: convolutions with a per-task mask on their output channels."""
from __future__ import annotations

import torch
from torch import nn

from ..config import HATConfig
from ..payload import HATPayload
from .base import HATModule


class _HATConvNd(HATModule):
    unit_dim = 1
    _base: type
    _spatial: int

    def forward(self, payload: HATPayload) -> HATPayload:
        x = payload.data if isinstance(payload, HATPayload) else None
        if x is not None and x.ndim != self._spatial + 2:
            raise ValueError(
                f"{type(self).__name__} expects a batched input of {self._spatial + 2} dims "
                f"(N, C, {', '.join('LHW'[-self._spatial:] if self._spatial < 3 else 'DHW')}); got shape {tuple(x.shape)}"
            )
        return self._hat_forward(payload, self._conv_forward, self.in_channels, 1, self.groups)

    @classmethod
    def from_base_module(cls, module: nn.Module, hat_config: HATConfig):
        """A HAT convolution with ``module``'s configuration and weights."""
        new = cls(module.in_channels, module.out_channels, module.kernel_size, hat_config,
                  stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups,
                  bias=module.bias is not None, padding_mode=module.padding_mode,
                  device=module.weight.device, dtype=module.weight.dtype)
        new.load_state_dict(module.state_dict(), strict=False)
        return new

    @torch.no_grad()
    def to_base_module(self, task_id: int | None = None) -> nn.Module:
        """A plain convolution; with ``task_id``, the task's binary mask is folded into it."""
        plain = self._base(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                           padding=self.padding, dilation=self.dilation, groups=self.groups,
                           bias=self.bias is not None, padding_mode=self.padding_mode,
                           device=self.weight.device, dtype=self.weight.dtype)
        plain.load_state_dict({k: v for k, v in self.state_dict().items() if k in ("weight", "bias")})
        if task_id is not None:
            m = self.binary_mask(task_id)
            plain.weight.mul_(m.view(-1, *([1] * (plain.weight.ndim - 1))))
            if plain.bias is not None:
                plain.bias.mul_(m)
        return plain


def _make(base: type, spatial: int, name: str):
    def __init__(self, in_channels, out_channels, kernel_size, hat_config: HATConfig, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        base.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                      device=device, dtype=dtype)
        self._init_hat(hat_config, out_channels, device, dtype)

    doc = (f"``nn.{base.__name__}`` (grouped and depthwise too, with or without bias) taking and "
           f"returning a :class:`HATPayload`; ``hat_config`` follows ``kernel_size``.")
    return type(name, (base, _HATConvNd), {"__init__": __init__, "forward": _HATConvNd.forward,
                                           "_base": base, "_spatial": spatial,
                                           "__doc__": doc, "__module__": __name__})


HATConv1d = _make(nn.Conv1d, 1, "HATConv1d")
HATConv2d = _make(nn.Conv2d, 2, "HATConv2d")
HATConv3d = _make(nn.Conv3d, 3, "HATConv3d")
