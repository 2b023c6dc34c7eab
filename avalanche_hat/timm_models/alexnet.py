"""The AlexNet-like network of the original HAT paper (Serra et al., 2018), so that results compare
with the literature: three convolutions of 64/128/256 filters of size 4/3/2, each followed by ReLU,
dropout (0.2, 0.2, 0.5) and 2x2 max-pooling, then two fully connected layers of 2048 units with ReLU
and dropout 0.5, then one head per task. No normalisation layers.

``hat_alexnet`` is the HAT network; ``cl_alexnet`` its plain twin (same architecture, same weight
names, ``head`` a single ``nn.Linear``) for baselines. Both take ``in_chans`` and ``img_size``
(32x32x3 CIFAR and 28x28x1 MNIST-like inputs both work).
"""
from __future__ import annotations

from functools import partial

import torch
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from torch import nn

from ..config import HATConfig
from ..modules import HATConv2d, HATLinear
from ..payload import HATPayload
from ._base import HATNetwork, check_num_classes, pair
from ._pretrained import build, cfg_from_plain

__all__ = ["HATAlexNet", "AlexNet"]

FILTERS = (64, 128, 256)
KERNELS = (4, 3, 2)
HIDDEN = 2048


def _feature_size(img_size) -> tuple[int, int]:
    """Spatial size after the three valid convolutions and 2x2 max-pools."""
    h, w = pair(img_size)
    for k in KERNELS:
        h, w = (h - k + 1) // 2, (w - k + 1) // 2
    if h < 1 or w < 1:
        raise ValueError(f"img_size {pair(img_size)} is too small for the HAT AlexNet: use at least 22x22")
    return h, w


def _check_input(x: torch.Tensor, in_chans: int, img_size: tuple[int, int], name: str) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans or tuple(x.shape[2:]) != img_size:
        raise ValueError(
            f"{name} was built for inputs (N, {in_chans}, {img_size[0]}, {img_size[1]}), got {tuple(x.shape)}: "
            f"create it with in_chans={x.shape[1] if x.ndim == 4 else '?'} and img_size={tuple(x.shape[2:])}"
        )


class HATAlexNet(HATNetwork):
    """The HAT paper's AlexNet-like network with HAT convolutions and linear layers.

    Args:
        hat_config: the HAT settings.
        num_classes: classes per task head (0: ``forward`` returns the 2048 features).
        in_chans, img_size: input channels and size.
        conv_drop_rates: dropout after each convolution block.
        drop_rate: dropout after each fully connected layer.
    """

    supports_grad_checkpointing = True

    def __init__(self, hat_config: HATConfig, num_classes: int = 10, in_chans: int = 3, img_size=32,
                 conv_drop_rates=(0.2, 0.2, 0.5), drop_rate: float = 0.5):
        super().__init__()
        self.hat_config = hat_config
        self.in_chans, self.img_size = in_chans, pair(img_size)
        h, w = _feature_size(self.img_size)
        chans = (in_chans,) + FILTERS
        for i, k in enumerate(KERNELS):
            self.add_module(f"conv{i + 1}", HATConv2d(chans[i], chans[i + 1], k, hat_config))
        self.conv_drops = nn.ModuleList(nn.Dropout(p) for p in conv_drop_rates)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = HATLinear(FILTERS[-1] * h * w, HIDDEN, hat_config)
        self.fc2 = HATLinear(HIDDEN, HIDDEN, hat_config)
        self.fc_drop = nn.Dropout(drop_rate)
        self.num_features = self.head_hidden_size = HIDDEN
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def forward_features(self, x, task_id: int | None = None, mask_scale: float | None = None) -> HATPayload:
        p = self._payload(x, task_id, mask_scale)
        _check_input(p.unmasked_data, self.in_chans, self.img_size, "hat_alexnet")
        # one checkpointed segment per layer with set_grad_checkpointing(True)
        for conv, drop in zip((self.conv1, self.conv2, self.conv3), self.conv_drops):
            p = self._segment(partial(self._conv_block, conv, drop), p, conv, drop)
        p = p.flatten(1)
        p = self._segment(partial(self._fc_block, self.fc1), p, self.fc1)
        return self._segment(partial(self._fc_block, self.fc2), p, self.fc2)

    def _conv_block(self, conv: HATConv2d, drop: nn.Module, p: HATPayload) -> HATPayload:
        return conv(p).forward_by(self.relu).forward_by(drop).forward_by(self.pool)

    def _fc_block(self, fc: HATLinear, p: HATPayload) -> HATPayload:
        return fc(p).forward_by(self.relu).forward_by(self.fc_drop)


class AlexNet(nn.Module):
    """Plain twin of :class:`HATAlexNet` (same layers, weight names and forward), timm-style."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size=32,
                 conv_drop_rates=(0.2, 0.2, 0.5), drop_rate: float = 0.5):
        super().__init__()
        self.in_chans, self.img_size = in_chans, pair(img_size)
        h, w = _feature_size(self.img_size)
        chans = (in_chans,) + FILTERS
        for i, k in enumerate(KERNELS):
            self.add_module(f"conv{i + 1}", nn.Conv2d(chans[i], chans[i + 1], k))
        self.conv_drops = nn.ModuleList(nn.Dropout(p) for p in conv_drop_rates)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(FILTERS[-1] * h * w, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc_drop = nn.Dropout(drop_rate)
        self.num_features = self.head_hidden_size = HIDDEN
        self.reset_classifier(num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = check_num_classes(num_classes)
        self.head = nn.Linear(HIDDEN, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_chans, self.img_size, "cl_alexnet")
        for conv, drop in zip((self.conv1, self.conv2, self.conv3), self.conv_drops):
            x = self.pool(drop(self.relu(conv(x))))
        x = x.flatten(1)
        x = self.fc_drop(self.relu(self.fc1(x)))
        return self.fc_drop(self.relu(self.fc2(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def adapt_plain_state_dict(self, state_dict: dict) -> dict:
        return state_dict


_CFG = dict(input_size=(3, 32, 32), fixed_input_size=True, num_classes=10, pool_size=None,
            first_conv="conv1", classifier="head", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
default_cfgs = generate_default_cfgs({"hat_alexnet": cfg_from_plain(None, **_CFG),
                                      "cl_alexnet": cfg_from_plain(None, **_CFG)})


@register_model
def hat_alexnet(pretrained: bool = False, **kwargs) -> HATAlexNet:
    """The HAT paper's AlexNet-like network; weights only from a local file (a ``cl_alexnet`` state dict)."""
    return build(HATAlexNet, "hat_alexnet", pretrained, **kwargs)


@register_model
def cl_alexnet(pretrained: bool = False, **kwargs) -> AlexNet:
    """Plain twin of ``hat_alexnet`` for baselines on exactly the same architecture."""
    return build(AlexNet, "cl_alexnet", pretrained, hat=False, **kwargs)
