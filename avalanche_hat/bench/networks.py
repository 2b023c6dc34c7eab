"""The networks of the leaderboard: every method trains the same architecture.

Each network comes in two twins with identical layers, sizes and (for one seed) identical initial
weights: a plain one (``forward(x) -> features``) for Avalanche's strategies and a HAT one
(``forward(x, task_id=..., mask_scale=...) -> features``, the contract of the timm models of
``avalanche_hat.timm_models``) for HAT. Per-task heads (one linear head per task, created up front)
sit on top of either: :class:`MultiHeadNet` for the baselines, ``HATMultiTaskModel`` for HAT.

- ``mlp``: flatten, ``Linear(in, width)``, ReLU, ``Linear(width, width)``, ReLU (default width 400).
- ``cnn``: two ``3x3`` conv-ReLU-maxpool stages (``width/8`` and ``width/4`` channels), then a
  ``Linear(., width)`` and ReLU.
- any other name ``X``: timm's ``hat_X`` and ``cl_X`` from ``avalanche_hat.timm_models`` (e.g.
  ``alexnet``); ``X`` is created with ``num_classes=0`` (pooled features).
"""
from __future__ import annotations

import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload
from avalanche_hat.modules import HATConv2d, HATLinear

LOCAL_NETWORKS = ("mlp", "cnn")


class PlainMLP(nn.Module):
    def __init__(self, in_chans: int, img_size: int, width: int = 400) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_chans * img_size * img_size, width)
        self.fc2 = nn.Linear(width, width)
        self.relu = nn.ReLU()
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc2(self.relu(self.fc1(x.flatten(1)))))


class HATMLP(nn.Module):
    """:class:`PlainMLP` with a HAT mask on each hidden layer."""

    def __init__(self, in_chans: int, img_size: int, hat_config: HATConfig, width: int = 400) -> None:
        super().__init__()
        self.fc1 = HATLinear(in_chans * img_size * img_size, width, hat_config)
        self.fc2 = HATLinear(width, width, hat_config)
        self.relu = nn.ReLU()
        self.num_features = width

    def forward(self, x, task_id: int | None = None, mask_scale: float | None = None) -> torch.Tensor:
        p = x if isinstance(x, HATPayload) else HATPayload(x, task_id=task_id, mask_scale=mask_scale)
        p = self.fc1(p.flatten(1)).forward_by(self.relu)
        return self.fc2(p).forward_by(self.relu).data


class PlainCNN(nn.Module):
    def __init__(self, in_chans: int, img_size: int, width: int = 256) -> None:
        super().__init__()
        c1, c2 = max(width // 8, 4), max(width // 4, 8)
        self.conv1 = nn.Conv2d(in_chans, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * (img_size // 4) ** 2, width)
        self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(2)
        self.num_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.relu(self.fc(x.flatten(1)))


class HATCNN(nn.Module):
    """:class:`PlainCNN` with a HAT mask on every conv channel and hidden unit."""

    def __init__(self, in_chans: int, img_size: int, hat_config: HATConfig, width: int = 256) -> None:
        super().__init__()
        c1, c2 = max(width // 8, 4), max(width // 4, 8)
        self.conv1 = HATConv2d(in_chans, c1, 3, hat_config, padding=1)
        self.conv2 = HATConv2d(c1, c2, 3, hat_config, padding=1)
        self.fc = HATLinear(c2 * (img_size // 4) ** 2, width, hat_config)
        self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(2)
        self.num_features = width

    def forward(self, x, task_id: int | None = None, mask_scale: float | None = None) -> torch.Tensor:
        p = x if isinstance(x, HATPayload) else HATPayload(x, task_id=task_id, mask_scale=mask_scale)
        p = self.conv1(p).forward_by(self.relu).forward_by(self.pool)
        p = self.conv2(p).forward_by(self.relu).forward_by(self.pool)
        return self.fc(p.flatten(1)).forward_by(self.relu).data


def build_trunk(name: str, *, in_chans: int, img_size: int, width: int | None = None,
                hat_config: HATConfig | None = None) -> nn.Module:
    """The feature extractor ``name``: the HAT twin when ``hat_config`` is given, else the plain one.
    The result has ``num_features``."""
    if name == "mlp":
        w = width or 400
        return HATMLP(in_chans, img_size, hat_config, w) if hat_config else PlainMLP(in_chans, img_size, w)
    if name == "cnn":
        w = width or 256
        return HATCNN(in_chans, img_size, hat_config, w) if hat_config else PlainCNN(in_chans, img_size, w)
    return _timm_trunk(name, in_chans=in_chans, img_size=img_size, hat_config=hat_config)


def _timm_trunk(name: str, *, in_chans: int, img_size: int, hat_config: HATConfig | None) -> nn.Module:
    try:
        import timm

        import avalanche_hat.timm_models  # noqa: F401  (registers hat_* / cl_* models)
    except ImportError as err:
        raise ValueError(
            f"network {name!r} needs avalanche_hat.timm_models ({err}); the built-in networks are "
            f"{', '.join(LOCAL_NETWORKS)}"
        ) from None
    model_name = f"hat_{name}" if hat_config else f"cl_{name}"
    if not timm.is_model(model_name):
        known = sorted(n[4:] for n in timm.list_models("hat_*"))
        raise ValueError(f"unknown network {name!r}: use {', '.join(LOCAL_NETWORKS)} or one of {known}")
    kwargs = dict(num_classes=0, in_chans=in_chans)
    if hat_config:
        kwargs["hat_config"] = hat_config
    try:
        return timm.create_model(model_name, img_size=img_size, **kwargs)
    except TypeError:  # models without an img_size argument (convolutional ones)
        return timm.create_model(model_name, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _multi_task_base():
    from avalanche.models import MultiTaskModule

    return MultiTaskModule


class SingleHeadNet(nn.Module):
    """A plain trunk with one linear head over all classes (class-incremental baselines, as
    Avalanche's ``SimpleMLP``; called without task labels)."""

    def __init__(self, trunk: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.num_features, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class MultiHeadNet(_multi_task_base()):
    """A plain trunk with one linear head per task, all heads created up front (Avalanche's
    ``MultiTaskModule``: mixed-task batches are split by task)."""

    def __init__(self, trunk: nn.Module, num_tasks: int, classes_per_task: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(trunk.num_features, classes_per_task) for _ in range(num_tasks))
        self.max_class_label = classes_per_task

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.heads[int(task_label)](self.trunk(x))
