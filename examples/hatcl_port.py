"""A HAT-CL training loop, ported to avalanche-hat call by call (see docs/migration.md).

HAT-CL's loop, as its users write it (``hat`` is HAT-CL's package)::

    model = MLP(hat_config=HATConfig(num_tasks=5))          # HATLinear layers, the last one too
    for task_id in range(5):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # fresh per task
        for epoch in range(epochs):
            for b, (x, y) in enumerate(loader):
                s = get_hat_mask_scale("cosine", max_trn_mask_scale=100.0, progress=b / (len(loader) - 1))
                out = model(HATPayload(x, task_id=task_id, mask_scale=s)).data
                loss = criterion(out, y) + c * get_hat_reg_term(model, "uniform", task_id=task_id, mask_scale=s)
                ...
        # (nothing here: HAT-CL marks a task trained in its first training forward)

The port below keeps the network's shape and the coefficient ``c`` (``kind="hatcl"`` is exactly
HAT-CL's term), and adds what this package needs: a per-task head instead of a HAT output layer
(``TaskIndexedLinear``), ``mark_task_trained`` after each task, and binary masks for evaluation
(``mask_scale=None``, as in HAT-CL). On scikit-learn's digits split into five 2-way tasks it checks,
and prints,

- each task's test accuracy, well above the 50% of chance,
- task 0's outputs after all five tasks are bit-identical (``torch.equal``) to those right after
  it was learned, and so are every other task's after the tasks that followed it.

Run: ``python examples/hatcl_port.py`` (``AVALANCHE_HAT_EXAMPLES_FAST=1``: fewer epochs).
"""
import os

import torch
from sklearn.datasets import load_digits
from torch import nn

from avalanche_hat import (CosineMaskScale, HATConfig, HATPayload, check_network_output, hat_regularization,
                           mark_task_trained, recorded_masks)
from avalanche_hat.modules import HATLinear, TaskIndexedLinear

FAST = os.environ.get("AVALANCHE_HAT_EXAMPLES_FAST") == "1"
EPOCHS = 5 if FAST else 15
NUM_TASKS = 5
C = 0.75              # HAT-CL's coefficient, kept: hat_regularization(kind="hatcl") is its term
MAX_SCALE = 100.0     # HAT-CL 0.1.1's default max_trn_mask_scale (this package's default is 400)


class MLP(nn.Module):
    """HAT-CL's two-HATLinear MLP; the output layer is a per-task head (a HAT output layer would
    have its few units, the classes, switched off by the usage penalty)."""

    def __init__(self, hat_config: HATConfig):
        super().__init__()
        self.linear1 = HATLinear(64, 100, hat_config)          # hat.modules.HATLinear
        self.linear2 = HATLinear(100, 100, hat_config)
        self.head = TaskIndexedLinear(100, 2, hat_config)      # was HATLinear(100, 2, hat_config)
        self.relu = nn.ReLU()

    def forward(self, x: HATPayload) -> torch.Tensor:         # takes a payload, as in HAT-CL
        x = self.linear1(x).forward_by(self.relu)
        x = self.linear2(x).forward_by(self.relu)
        return self.head(x)                                     # HAT-CL: self.linear2(x).data


def split_digits():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(NUM_TASKS):
        idx = torch.nonzero((y == 2 * t) | (y == 2 * t + 1)).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = len(idx) * 3 // 4
        tasks.append((x[idx[:cut]], y[idx[:cut]] - 2 * t, x[idx[cut:]], y[idx[cut:]] - 2 * t))
    return tasks


def train_task(model, task_id, x, y, batch=32):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # fresh per task, no weight decay
    schedule = CosineMaskScale(MAX_SCALE)  # get_hat_mask_scale("cosine", ...); see the migration guide
    batches = (len(x) + batch - 1) // batch
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x))
        for b in range(batches):
            i = order[b * batch:(b + 1) * batch]
            s = schedule.at(b, batches)                          # progress b / (batches - 1)
            with recorded_masks() as masks:                      # the regulariser reuses these masks
                out = model(HATPayload(x[i], task_id=task_id, mask_scale=s))
            check_network_output(out)                            # refuses a HAT output layer
            reg = hat_regularization(model, task_id, s, kind="hatcl", recorded=masks)  # get_hat_reg_term
            loss = nn.functional.cross_entropy(out, y[i]) + C * reg
            if not torch.isfinite(loss):                         # a nan step would reach earlier tasks
                raise FloatingPointError(f"loss is {loss.item()} at task {task_id}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    mark_task_trained(model, task_id)                            # new: protect the task from now on


@torch.no_grad()
def evaluate(model, task_id, x, y):
    model.eval()
    out = model(HATPayload(x, task_id=task_id))                  # mask_scale=None: binary masks
    return out, (out.argmax(1) == y).float().mean().item()


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tasks = split_digits()
    model = MLP(HATConfig(num_tasks=NUM_TASKS, max_mask_scale=MAX_SCALE))
    right_after = {}
    for t, (x, y, xt, yt) in enumerate(tasks):
        train_task(model, t, x, y)
        right_after[t] = evaluate(model, t, xt, yt)
        print(f"task {t} learned: test accuracy {right_after[t][1]:.3f}")
    print("after all five tasks:")
    for t, (_, _, xt, yt) in enumerate(tasks):
        out, acc = evaluate(model, t, xt, yt)
        same = torch.equal(out, right_after[t][0])
        print(f"  task {t}: test accuracy {acc:.3f}, outputs bit-identical to right after it was learned: {same}")
        assert acc >= 0.9, f"task {t} was not learned (accuracy {acc:.3f})"
        assert same, f"task {t} changed after later tasks were learned"
    print("OK: the ported loop learned every task and no task changed afterwards")


if __name__ == "__main__":
    main()
