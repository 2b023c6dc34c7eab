"""Small HAT networks and synthetic tasks shared by the tests."""
from __future__ import annotations

import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload, hat_regularization, mark_task_trained
from avalanche_hat.mechanism import CosineMaskScale
from avalanche_hat.modules import HATConv2d, HATLinear, TaskIndexedBatchNorm2d


class SmallConvNet(nn.Module):
    """conv-bn-relu-pool, conv-bn-relu-pool, a residual block, fc, and one head per task."""

    def __init__(self, cfg: HATConfig, classes: int = 2, width: int = 8):
        super().__init__()
        self.conv1 = HATConv2d(3, width, 3, cfg, padding=1)
        self.bn1 = TaskIndexedBatchNorm2d(width, cfg)
        self.conv2 = HATConv2d(width, 2 * width, 3, cfg, padding=1, bias=False)
        self.bn2 = TaskIndexedBatchNorm2d(2 * width, cfg)
        self.conv3 = HATConv2d(2 * width, 2 * width, 3, cfg, padding=1, groups=2)
        self.bn3 = TaskIndexedBatchNorm2d(2 * width, cfg)
        self.fc = HATLinear(2 * width * 4, 4 * width, cfg)
        self.heads = nn.ModuleList(nn.Linear(4 * width, classes) for _ in range(cfg.num_tasks))
        self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor, task_id: int, mask_scale: float | None = None) -> torch.Tensor:
        p = HATPayload(x, task_id=task_id, mask_scale=mask_scale)
        p = self.bn1(self.conv1(p)).forward_by(self.relu).forward_by(self.pool)
        p = self.bn2(self.conv2(p)).forward_by(self.relu).forward_by(self.pool)
        p = (self.bn3(self.conv3(p)) + p).forward_by(self.relu)  # residual add
        p = p.forward_by(nn.AdaptiveAvgPool2d(2)).flatten(1)
        p = self.fc(p).forward_by(self.relu)
        return self.heads[task_id](p.data)


def make_tasks(num_tasks: int, n: int = 64, seed: int = 0):
    """Binary tasks on 8x8 images: each task separates two random prototypes plus noise."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(num_tasks):
        protos = torch.randn(2, 3, 8, 8, generator=g)
        y = torch.arange(n) % 2
        x = protos[y] + 0.8 * torch.randn(n, 3, 8, 8, generator=g)
        tasks.append((x, y))
    return tasks


def train_task(model, task_id, x, y, optimizer_factory, epochs=8, batch=16, reg=0.1):
    """Train one task with a fresh optimizer, the cosine schedule and the layerwise regulariser."""
    model.train()
    opt = optimizer_factory(model.parameters())
    schedule = CosineMaskScale(400.0)
    steps = (len(x) + batch - 1) // batch
    for _ in range(epochs):
        for b in range(steps):
            s = schedule.at(b, steps)
            xb, yb = x[b * batch:(b + 1) * batch], y[b * batch:(b + 1) * batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb, task_id, s), yb)
            loss = loss + reg * hat_regularization(model, task_id, s)
            loss.backward()
            opt.step()
    mark_task_trained(model, task_id)


@torch.no_grad()
def outputs(model, task_id, x):
    model.eval()
    return model(x, task_id, None)
