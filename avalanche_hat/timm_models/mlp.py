"""A small multilayer perceptron for MNIST-like inputs (Fashion-MNIST 28x28 grayscale by default).

The input (``in_chans x img_size``) is flattened, then each hidden layer is a linear layer, ReLU
and dropout; one head per task. ``hat_mlp`` is the HAT network, ``cl_mlp`` its plain twin with the
same weight names (``hidden.<i>``, ``head``).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from torch import nn

from ..config import HATConfig
from ..modules import HATLinear
from ..payload import HATPayload
from ._base import HATNetwork, check_num_classes, pair
from ._pretrained import build, cfg_from_plain

__all__ = ["HATMLP", "MLP"]


def _check_sizes(hidden_sizes) -> tuple[int, ...]:
    sizes = tuple(hidden_sizes)
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(f"hidden_sizes must be a non-empty sequence of positive ints, got {hidden_sizes!r}")
    return sizes


def _check_input(x: torch.Tensor, shape: tuple[int, int, int], name: str) -> None:
    if tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"{name} was built for inputs (N, {shape[0]}, {shape[1]}, {shape[2]}), got {tuple(x.shape)}: create "
            "it with the in_chans and img_size of your data"
        )


class HATMLP(HATNetwork):
    """Flatten, then ``HATLinear - ReLU - dropout`` per hidden layer, then one head per task.

    Args:
        hat_config: the HAT settings.
        num_classes: classes per task head (0: ``forward`` returns the last hidden layer).
        in_chans, img_size: input channels and size (default 1 x 28 x 28).
        hidden_sizes: units of each hidden layer (default two layers of 400).
        drop_rate: dropout after each hidden layer.
    """

    supports_grad_checkpointing = True

    def __init__(self, hat_config: HATConfig, num_classes: int = 10, in_chans: int = 1, img_size=28,
                 hidden_sizes=(400, 400), drop_rate: float = 0.0):
        super().__init__()
        self.hat_config = hat_config
        self.input_shape = (in_chans, *pair(img_size))
        self.in_chans = in_chans
        sizes = (math.prod(self.input_shape),) + _check_sizes(hidden_sizes)
        self.hidden = nn.ModuleList(HATLinear(a, b, hat_config) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = nn.ReLU()
        self.drop = nn.Dropout(drop_rate)
        self.num_features = self.head_hidden_size = sizes[-1]
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def forward_features(self, x, task_id: int | None = None, mask_scale: float | None = None) -> HATPayload:
        p = self._payload(x, task_id, mask_scale)
        _check_input(p.unmasked_data, self.input_shape, "hat_mlp")
        p = p.flatten(1)
        for layer in self.hidden:  # one checkpointed segment per layer with set_grad_checkpointing(True)
            p = self._segment(partial(self._layer, layer), p, layer)
        return p

    def _layer(self, layer: HATLinear, p: HATPayload) -> HATPayload:
        return layer(p).forward_by(self.act).forward_by(self.drop)


class MLP(nn.Module):
    """Plain twin of :class:`HATMLP` (same layers, weight names and forward), timm-style."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size=28, hidden_sizes=(400, 400),
                 drop_rate: float = 0.0):
        super().__init__()
        self.input_shape = (in_chans, *pair(img_size))
        self.in_chans = in_chans
        sizes = (math.prod(self.input_shape),) + _check_sizes(hidden_sizes)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = nn.ReLU()
        self.drop = nn.Dropout(drop_rate)
        self.num_features = self.head_hidden_size = sizes[-1]
        self.reset_classifier(num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = check_num_classes(num_classes)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.input_shape, "cl_mlp")
        x = x.flatten(1)
        for layer in self.hidden:
            x = self.drop(self.act(layer(x)))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def adapt_plain_state_dict(self, state_dict: dict) -> dict:
        return state_dict


_CFG = dict(input_size=(1, 28, 28), fixed_input_size=True, num_classes=10, pool_size=None,
            first_conv=None, classifier="head", mean=(0.5,), std=(0.5,), crop_pct=1.0)
default_cfgs = generate_default_cfgs({"hat_mlp": cfg_from_plain(None, **_CFG), "cl_mlp": cfg_from_plain(None, **_CFG)})


@register_model
def hat_mlp(pretrained: bool = False, **kwargs) -> HATMLP:
    """HAT MLP (default: 1x28x28 input, two hidden layers of 400); weights only from a local file."""
    return build(HATMLP, "hat_mlp", pretrained, **kwargs)


@register_model
def cl_mlp(pretrained: bool = False, **kwargs) -> MLP:
    """Plain twin of ``hat_mlp`` for baselines on exactly the same architecture."""
    return build(MLP, "cl_mlp", pretrained, hat=False, **kwargs)
