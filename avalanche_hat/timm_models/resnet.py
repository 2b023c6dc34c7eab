"""HAT ResNet-18/34 (timm's ``resnet18``/``resnet34`` layout and weight names), with the ImageNet stem
or a stem for small images (3x3 stride-1 convolution, no max-pool: ``*s`` variants, CIFAR 32x32).

Every convolution is a :class:`HATConv2d` followed by a :class:`TaskIndexedBatchNorm2d` that folds
its mask into the task's affine parameters, so no mask ever multiplies a full activation; the
classifier is a :class:`TaskIndexedLinear` (one head per task). Also registers ``cl_resnet18s`` and
``cl_resnet34s``: timm ResNets with the same small-image stem, the plain twins of the ``*s`` nets.
"""
from __future__ import annotations

import logging

import torch
from timm.models import register_model
from timm.models._registry import generate_default_cfgs
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from ..config import HATConfig
from ..modules import HATConv2d, TaskIndexedBatchNorm2d
from ..payload import HATPayload
from ._base import HATNetwork
from ._pretrained import build, cfg_from_plain

_logger = logging.getLogger(__name__)

__all__ = ["HATBasicBlock", "HATResNet", "SmallStemResNet"]


def _stem_conv_fits(state_dict: dict, conv: nn.Conv2d, name: str = "conv1") -> dict:
    """A plain ImageNet stem (7x7) cannot serve a small-image stem (3x3): keep the model's own."""
    key = f"{name}.weight"
    weight = state_dict.get(key)
    if weight is not None and tuple(weight.shape[2:]) != tuple(conv.weight.shape[2:]):
        _logger.warning(
            "pretrained %s has %s kernels, the small-image stem %s: the stem keeps its fresh initialisation",
            key, tuple(weight.shape[2:]), tuple(conv.weight.shape[2:]),
        )
        state_dict[key] = conv.weight.detach().clone()
    return state_dict


class HATBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) shortcut, then ReLU (timm's BasicBlock)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, hat_config: HATConfig, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = HATConv2d(inplanes, planes, 3, hat_config, stride=stride, padding=1, bias=False)
        self.bn1 = TaskIndexedBatchNorm2d(planes, hat_config)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = HATConv2d(planes, planes, 3, hat_config, padding=1, bias=False)
        self.bn2 = TaskIndexedBatchNorm2d(planes, hat_config)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    @torch.no_grad()
    def zero_init_last(self) -> None:
        for bn in self.bn2.copies:
            nn.init.zeros_(bn.weight)

    def forward(self, x: HATPayload) -> HATPayload:
        shortcut = x
        out = self.bn1(self.conv1(x)).forward_by(self.act1)
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return (out + shortcut).forward_by(self.act2)


class HATResNet(HATNetwork):
    """ResNet with HAT convolutions, task-indexed BatchNorm and one classifier head per task.

    Args:
        layers: blocks per stage (``(2, 2, 2, 2)`` for ResNet-18, ``(3, 4, 6, 3)`` for ResNet-34).
        hat_config: the HAT settings (number of tasks, ...).
        num_classes: classes per task head; 0 for no head (``forward`` returns pooled features).
        in_chans: input channels.
        small_stem: 3x3 stride-1 stem without max-pool, for small images such as CIFAR's 32x32.
        global_pool: ``'avg'`` or ``'max'``.
        drop_rate: dropout before the head.
        zero_init_last: start the last BatchNorm of each block (every task's copy) at weight 0, as timm.
    """

    classifier_attr = "fc"
    supports_grad_checkpointing = True

    def __init__(self, layers, hat_config: HATConfig, num_classes: int = 1000, in_chans: int = 3,
                 small_stem: bool = False, global_pool: str = "avg", drop_rate: float = 0.0,
                 zero_init_last: bool = True, stem_width: int = 64):
        super().__init__()
        self.hat_config = hat_config
        self.in_chans = in_chans
        self.small_stem = small_stem
        self.drop_rate = float(drop_rate)
        if small_stem:
            self.conv1 = HATConv2d(in_chans, stem_width, 3, hat_config, stride=1, padding=1, bias=False)
        else:
            self.conv1 = HATConv2d(in_chans, stem_width, 7, hat_config, stride=2, padding=3, bias=False)
        self.bn1 = TaskIndexedBatchNorm2d(stem_width, hat_config)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem_width
        self.feature_info = [dict(num_chs=stem_width, reduction=1 if small_stem else 2, module="act1")]
        reduction = 1 if small_stem else 4
        for i, (blocks, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            reduction *= stride
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(
                    HATConv2d(inplanes, planes, 1, hat_config, stride=stride, bias=False),
                    TaskIndexedBatchNorm2d(planes, hat_config),
                )
            stage = [HATBasicBlock(inplanes, planes, hat_config, stride, downsample)]
            stage += [HATBasicBlock(planes, planes, hat_config) for _ in range(1, blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
            self.feature_info.append(dict(num_chs=planes, reduction=reduction, module=f"layer{i + 1}"))
        self.num_features = self.head_hidden_size = inplanes
        self._set_global_pool(global_pool)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.num_classes = num_classes
        self.fc = self._make_head(num_classes)
        self._init_weights(zero_init_last)

    @torch.no_grad()
    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, HATConv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, HATBasicBlock):
                    m.zero_init_last()

    def _set_global_pool(self, global_pool: str) -> None:
        pools = {"avg": nn.AdaptiveAvgPool2d(1), "max": nn.AdaptiveMaxPool2d(1)}
        if global_pool not in pools:
            raise ValueError(f"global_pool must be one of {sorted(pools)} for HAT ResNets, got {global_pool!r}")
        self.global_pool = pools[global_pool]

    def forward_features(self, x, task_id: int | None = None, mask_scale: float | None = None) -> HATPayload:
        p = self._payload(x, task_id, mask_scale)
        p = self.bn1(self.conv1(p)).forward_by(self.act1).forward_by(self.maxpool)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:  # one checkpointed segment per block with set_grad_checkpointing(True)
                p = self._segment(block, p)
        return p

    def _pool(self, payload: HATPayload) -> HATPayload:
        return payload.forward_by(self.global_pool).flatten(1)

    def adapt_plain_state_dict(self, state_dict: dict) -> dict:
        return _stem_conv_fits(state_dict, self.conv1) if self.small_stem else state_dict


class SmallStemResNet(ResNet):
    """timm's ResNet with the small-image stem (3x3 stride-1 conv, no max-pool): plain twin of the
    ``hat_resnet*s`` networks, same weight names."""

    def __init__(self, *args, stem_width: int = 64, **kwargs):
        super().__init__(*args, stem_width=stem_width, **kwargs)
        in_chans = self.conv1.in_channels
        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        for info in self.feature_info:
            info["reduction"] = max(1, info["reduction"] // 4) if info["module"] != "act1" else 1

    def adapt_plain_state_dict(self, state_dict: dict) -> dict:
        return _stem_conv_fits(state_dict, self.conv1)


_SMALL = dict(input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0, test_input_size=None)
default_cfgs = generate_default_cfgs({
    "hat_resnet18.a1_in1k": cfg_from_plain("resnet18.a1_in1k"),
    "hat_resnet34.a1_in1k": cfg_from_plain("resnet34.a1_in1k"),
    "hat_resnet18s.a1_in1k": cfg_from_plain("resnet18.a1_in1k", **_SMALL),
    "hat_resnet34s.a1_in1k": cfg_from_plain("resnet34.a1_in1k", **_SMALL),
    "cl_resnet18s.a1_in1k": cfg_from_plain("resnet18.a1_in1k", **_SMALL),
    "cl_resnet34s.a1_in1k": cfg_from_plain("resnet34.a1_in1k", **_SMALL),
})


def _hat_resnet(variant: str, layers, small_stem: bool, pretrained: bool, **kwargs) -> HATResNet:
    return build(HATResNet, variant, pretrained, layers=layers, small_stem=small_stem, **kwargs)


@register_model
def hat_resnet18(pretrained: bool = False, **kwargs) -> HATResNet:
    """HAT ResNet-18, ImageNet stem; ``pretrained`` maps timm's ``resnet18`` weights onto it."""
    return _hat_resnet("hat_resnet18", (2, 2, 2, 2), False, pretrained, **kwargs)


@register_model
def hat_resnet34(pretrained: bool = False, **kwargs) -> HATResNet:
    """HAT ResNet-34, ImageNet stem; ``pretrained`` maps timm's ``resnet34`` weights onto it."""
    return _hat_resnet("hat_resnet34", (3, 4, 6, 3), False, pretrained, **kwargs)


@register_model
def hat_resnet18s(pretrained: bool = False, **kwargs) -> HATResNet:
    """HAT ResNet-18 with the small-image stem (CIFAR); ``pretrained`` maps ``resnet18`` weights but the stem."""
    return _hat_resnet("hat_resnet18s", (2, 2, 2, 2), True, pretrained, **kwargs)


@register_model
def hat_resnet34s(pretrained: bool = False, **kwargs) -> HATResNet:
    """HAT ResNet-34 with the small-image stem (CIFAR); ``pretrained`` maps ``resnet34`` weights but the stem."""
    return _hat_resnet("hat_resnet34s", (3, 4, 6, 3), True, pretrained, **kwargs)


@register_model
def cl_resnet18s(pretrained: bool = False, **kwargs) -> SmallStemResNet:
    """Plain timm ResNet-18 with the small-image stem: the baseline twin of ``hat_resnet18s``."""
    return build(SmallStemResNet, "cl_resnet18s", pretrained, hat=False, block=BasicBlock,
                 layers=(2, 2, 2, 2), **kwargs)


@register_model
def cl_resnet34s(pretrained: bool = False, **kwargs) -> SmallStemResNet:
    """Plain timm ResNet-34 with the small-image stem: the baseline twin of ``hat_resnet34s``."""
    return build(SmallStemResNet, "cl_resnet34s", pretrained, hat=False, block=BasicBlock,
                 layers=(3, 4, 6, 3), **kwargs)
