"""Selective forgetting: erase one learned task, and every other task stays bit-identical.

A small HAT network (two HATLinear layers, one head per task) learns five tasks of scikit-learn's
digits (0/1, 2/3, 4/5, 6/7, 8/9) in a plain PyTorch loop, with the core API only (no Avalanche).
Then ``forget_task(model, 2, dry_run=True)`` reports what forgetting task 2 would re-initialise
(changing nothing), ``forget_task(model, 2)`` erases it, and task 2 is learned again. The script
checks, and prints, that

- every task was learned (test accuracy well above chance),
- the dry run changed no parameter or buffer and reported exactly what the real run then did,
- the outputs of tasks 0, 1, 3 and 4 are bit-identical (``torch.equal``) before and after,
- task 2 no longer computes what it learned: it is unmarked, its units only it used are
  re-initialised and free, its embeddings and head are a fresh task's,
- task 2 learns again (well above chance), and tasks 0, 1, 3 and 4 are still bit-identical.

Run: ``python examples/selective_forgetting.py`` (``AVALANCHE_HAT_EXAMPLES_FAST=1``: fewer epochs).
"""
import os

import torch
from sklearn.datasets import load_digits
from torch import nn

from avalanche_hat import (
    CosineMaskScale, HATConfig, HATPayload, forget_task, hat_regularization, mark_task_trained,
    recorded_masks, trained_tasks,
)
from avalanche_hat.modules import HATLinear, TaskIndexedLinear

FAST = os.environ.get("AVALANCHE_HAT_EXAMPLES_FAST") == "1"
EPOCHS = 6 if FAST else 20
NUM_TASKS, FORGET = 5, 2


class Net(nn.Module):
    def __init__(self, cfg: HATConfig):
        super().__init__()
        self.fc1, self.fc2 = HATLinear(64, 100, cfg), HATLinear(100, 100, cfg)
        self.head = TaskIndexedLinear(100, 2, cfg)  # one 2-way head per task
        self.relu = nn.ReLU()

    def forward(self, x, task_id, mask_scale=None):  # mask_scale=None: binary masks (inference)
        p = HATPayload(x, task_id=task_id, mask_scale=mask_scale)
        p = self.fc1(p).forward_by(self.relu)
        p = self.fc2(p).forward_by(self.relu)
        return self.head(p)


def split_digits():
    """Per task: (train x, train y, test x, test y), labels 0/1 within the task; 25% held out."""
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


def train_task(model, t, x, y, schedule, batch=32):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # a fresh one per task
    batches = (len(x) + batch - 1) // batch
    for _ in range(EPOCHS):
        order = torch.randperm(len(x))
        for b in range(batches):
            i = order[b * batch:(b + 1) * batch]
            s = schedule.at(b, batches)  # HAT-CL's cosine schedule within the epoch
            with recorded_masks() as masks:
                out = model(x[i], t, s)
            loss = nn.functional.cross_entropy(out, y[i]) + 0.75 * hat_regularization(model, t, s, recorded=masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    mark_task_trained(model, t)  # from now on task t's units are protected


@torch.no_grad()
def outputs_and_accuracy(model, tasks):
    model.eval()
    result = []
    for t, (_, _, xt, yt) in enumerate(tasks):
        out = model(xt, t)
        result.append((out, (out.argmax(1) == yt).float().mean().item()))
    model.train()
    return result


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tasks = split_digits()
    model = Net(HATConfig(num_tasks=NUM_TASKS))
    schedule = CosineMaskScale(400.0)
    for t, (x, y, _, _) in enumerate(tasks):
        train_task(model, t, x, y, schedule)

    before = outputs_and_accuracy(model, tasks)
    print("test accuracy before forgetting:", " ".join(f"task {t} {a:.3f}" for t, (_, a) in enumerate(before)))
    for t, (_, acc) in enumerate(before):
        assert acc >= 0.9, f"task {t} was not learned (accuracy {acc:.3f})"

    state = {k: v.clone() for k, v in model.state_dict().items()}
    dry = forget_task(model, FORGET, dry_run=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "the dry run changed the model"
    print(f"dry run: {dry}")
    result = forget_task(model, FORGET)
    assert dict(result) == dict(dry) and result.layers == dry.layers, "the dry run reported something else"
    print(result.to_markdown())
    after = outputs_and_accuracy(model, tasks)
    print("test accuracy after forgetting: ", " ".join(f"task {t} {a:.3f}" for t, (_, a) in enumerate(after)))
    for t in range(NUM_TASKS):
        same = torch.equal(before[t][0], after[t][0])
        print(f"task {t}: outputs bit-identical to before: {same}")
        if t != FORGET:
            assert same, f"task {t} changed when task {FORGET} was forgotten"
    assert not torch.equal(before[FORGET][0], after[FORGET][0]), "the forgotten task still computes what it did"
    assert FORGET not in trained_tasks(model), "a forgotten task is no longer marked trained"
    assert torch.equal(model.fc1.mask_embedding[FORGET], torch.ones(100)), "a fresh task's embeddings (dense: 1)"

    x, y, _, _ = tasks[FORGET]
    train_task(model, FORGET, x, y, schedule)  # the same loop as any task
    again = outputs_and_accuracy(model, tasks)
    print("test accuracy after learning it again:", " ".join(f"task {t} {a:.3f}" for t, (_, a) in enumerate(again)))
    assert again[FORGET][1] >= 0.9, f"task {FORGET} did not learn again ({again[FORGET][1]:.3f})"
    for t in range(NUM_TASKS):
        if t != FORGET:
            assert torch.equal(before[t][0], again[t][0]), f"task {t} changed when task {FORGET} was learned again"
    print(f"OK: task {FORGET} was forgotten and learned again; every other task stayed bit-identical")

if __name__ == "__main__":
    main()
