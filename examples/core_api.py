"""The HAT core without Avalanche or timm: a network, its training loop, and the guarantee.

The code of the docs' section "The HAT core, without Avalanche or timm" (docs/getting-started.md),
runnable: a small convolutional HAT network (``HATConv2d`` + ``TaskIndexedBatchNorm2d`` +
``HATLinear``, then one 2-way head per task, ``TaskIndexedLinear``) learns two tasks of
scikit-learn's digits (0 vs 1, then 2 vs 3) in a plain PyTorch loop: HAT-CL's cosine mask-scale
schedule, the masks of the forward recorded for the usage penalty, ``mark_task_trained`` after each
task. The script checks, and prints, that

- both tasks are learned (test accuracy well above the 50% of chance),
- task 0's outputs after learning task 1 are bit-identical (``torch.equal``) to those before.

The classifier is a per-task head on purpose: a HAT layer as the output layer would have its few
output units switched off by the usage penalty, and the network would learn nothing.

Run: ``python examples/core_api.py`` (``AVALANCHE_HAT_EXAMPLES_FAST=1``: fewer epochs).
"""
import os

import torch
from sklearn.datasets import load_digits
from torch import nn

from avalanche_hat import HATConfig, HATPayload, hat_regularization, mark_task_trained, recorded_masks
from avalanche_hat.mechanism import CosineMaskScale
from avalanche_hat.modules import HATConv2d, HATLinear, TaskIndexedBatchNorm2d, TaskIndexedLinear

FAST = os.environ.get("AVALANCHE_HAT_EXAMPLES_FAST") == "1"
EPOCHS = 4 if FAST else 10


# --8<-- [start:core]
class Net(nn.Module):
    """HAT layers for the features, one unmasked 2-way head per task for the output."""

    def __init__(self, cfg: HATConfig):
        super().__init__()
        self.conv = HATConv2d(1, 32, 3, cfg, padding=1)
        self.bn = TaskIndexedBatchNorm2d(32, cfg)  # per-task statistics and affine parameters
        self.fc = HATLinear(32 * 4 * 4, 64, cfg)
        self.head = TaskIndexedLinear(64, 2, cfg)  # the output layer: per task, never a HAT layer
        self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, x, task_id, mask_scale=None):  # mask_scale=None: binary masks (inference)
        p = HATPayload(x, task_id=task_id, mask_scale=mask_scale)
        p = self.bn(self.conv(p)).forward_by(self.relu).forward_by(self.pool).flatten(1)
        p = self.fc(p).forward_by(self.relu)
        return self.head(p)  # logits of task_id's head (a tensor)


def train_task(model, t, x, y, epochs, batch=32, reg_coef=0.75):
    """Learn task ``t`` on ``(x, y)``, then protect it."""
    schedule = CosineMaskScale(max_scale=400.0)  # HAT-CL Eq. 6, within each epoch
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # a fresh one per task, no weight decay
    batches = (len(x) + batch - 1) // batch
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for b in range(batches):
            i = order[b * batch:(b + 1) * batch]
            s = schedule.at(b, batches)
            with recorded_masks() as masks:  # the regulariser reuses the forward's masks
                out = model(x[i], t, s)
            loss = nn.functional.cross_entropy(out, y[i]) + reg_coef * hat_regularization(model, t, s, recorded=masks)
            if not torch.isfinite(loss):  # a non-finite step would reach earlier tasks' outputs
                raise FloatingPointError(f"loss is {loss.item()} at task {t}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    mark_task_trained(model, t)  # from now on task t's units are protected (Eq. 2)
# --8<-- [end:core]


def split_digits(num_tasks):
    """Per task: (train x, train y, test x, test y) as 1x8x8 images, labels 0/1 within the task."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(num_tasks):
        idx = torch.nonzero((y == 2 * t) | (y == 2 * t + 1)).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = len(idx) * 3 // 4
        tasks.append((x[idx[:cut]], y[idx[:cut]] - 2 * t, x[idx[cut:]], y[idx[cut:]] - 2 * t))
    return tasks


@torch.no_grad()
def test(model, t, x, y):
    """Task ``t``'s logits with binary masks, and its accuracy."""
    model.eval()
    out = model(x, t)
    return out, (out.argmax(1) == y).float().mean().item()


def main(epochs=EPOCHS):
    torch.manual_seed(0)
    tasks = split_digits(2)
    model = Net(HATConfig(num_tasks=2))

    x0, y0, xt0, yt0 = tasks[0]
    train_task(model, 0, x0, y0, epochs)
    out0, acc0 = test(model, 0, xt0, yt0)

    x1, y1, xt1, yt1 = tasks[1]
    train_task(model, 1, x1, y1, epochs)
    out1, acc1 = test(model, 1, xt1, yt1)
    out0_after, acc0_after = test(model, 0, xt0, yt0)

    unchanged = torch.equal(out0, out0_after)
    print(f"task 0 (digits 0/1): test accuracy {acc0:.3f}; task 1 (digits 2/3): {acc1:.3f}")
    print(f"task 0 after learning task 1: accuracy {acc0_after:.3f}, outputs bit-identical: {unchanged}")
    assert acc0 >= 0.9 and acc1 >= 0.9, f"a task was not learned (accuracy {acc0:.3f} / {acc1:.3f}; chance is 0.5)"
    assert not torch.equal(out0, test(model, 1, xt0, yt0)[0]), "both tasks compute the same outputs"
    assert unchanged, "task 0's outputs changed when task 1 was learned"
    print("OK: both tasks learned, task 0 bit-identical after task 1")
    return acc0, acc1, unchanged


if __name__ == "__main__":
    main()
