"""Any timm model under HAT in one call, and one task exported back as a small plain network.

A timm ResNet (``resnet10t``, untouched, pretrained=False) goes straight into the Avalanche
strategy ``HAT(model=...)``, which converts it (``avalanche_hat.convert``) and learns 3 tasks of
scikit-learn's digits (pairs of classes, 8x8 images upscaled to 32x32). It checks that:

* task 0's outputs are bit-identical after learning tasks 1 and 2 (``torch.equal``);
* ``export_task(net, 0)`` is a plain module with fewer parameters than the original, whose outputs
  match the HAT network's for task 0, and which ``torch.export`` accepts.

``AVALANCHE_HAT_EXAMPLES_FAST=1``: fewer images and one epoch (well under a minute on 2 cores).
"""
from __future__ import annotations

import os

import timm
import torch
import torch.nn.functional as F
from avalanche.benchmarks import nc_benchmark
from avalanche.training.plugins import EvaluationPlugin
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from avalanche_hat import HAT, HATConfig, export_task

FAST = os.environ.get("AVALANCHE_HAT_EXAMPLES_FAST") == "1"
TASKS = 3
torch.manual_seed(0)
torch.set_num_threads(min(2, torch.get_num_threads()))


def digits_benchmark():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    keep = y < 2 * TASKS
    x, y = x[keep], y[keep]
    perm = torch.randperm(len(y))
    x, y = x[perm], y[perm]
    if FAST:
        x, y = x[:360], y[:360]
    split = int(0.8 * len(y))

    def dataset(a, b):
        ds = TensorDataset(a, b)
        ds.targets = b.tolist()
        return ds

    return nc_benchmark(dataset(x[:split], y[:split]), dataset(x[split:], y[split:]), n_experiences=TASKS,
                        task_labels=True, seed=0, class_ids_from_zero_in_each_exp=True, fixed_class_order=list(range(2 * TASKS)))


benchmark = digits_benchmark()
model = timm.create_model("resnet10t", pretrained=False, num_classes=2)  # any model; 2 classes per task
strategy = HAT(model=model, hat_config=HATConfig(num_tasks=TASKS, mask_init="normal"),  # original HAT init: about half the units start off
               optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
               train_mb_size=32, train_epochs=1 if FAST else 4, eval_mb_size=128,
               evaluator=EvaluationPlugin(loggers=[]))  # this script prints its own figures
net = strategy.model.backbone  # the converted network: net(x, task_id=t, mask_scale=s)
print(net.hat_report.summary())

probe_data = benchmark.test_stream[0].dataset.eval()
probe = torch.stack([probe_data[i][0] for i in range(min(32, len(probe_data)))])
outputs = {}
for experience in benchmark.train_stream:
    strategy.train(experience)
    t = experience.current_experience
    net.eval()
    with torch.no_grad():
        outputs[t] = net(probe, task_id=0)
    acc = []
    for e in benchmark.test_stream[: t + 1]:
        data = e.dataset.eval()
        xs = torch.stack([data[i][0] for i in range(len(data))])
        ys = torch.tensor([data[i][1] for i in range(len(data))])
        with torch.no_grad():
            acc.append((net(xs, task_id=e.current_experience).argmax(1) == ys).float().mean().item())
    print(f"after task {t}: accuracy per task {[round(a, 3) for a in acc]}")

for t in range(1, TASKS):
    assert torch.equal(outputs[0], outputs[t]), f"task 0's outputs changed while learning task {t}"
print("task 0's outputs are bit-identical after learning every later task")

small = export_task(net, 0)
with torch.no_grad():
    err = (small(probe) - net(probe, task_id=0)).abs().max().item()
params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
print(f"export_task(net, 0): {params(small):,} parameters (original {params(model):,}; "
      f"{len(small.hat_export.pruned)} of {len(small.hat_export)} HAT layers pruned), max |diff| {err:.2e}")
assert err < 1e-4 * max(1.0, net(probe, task_id=0).abs().max().item())
assert params(small) < params(model), "the exported task is not smaller than the original"
program = torch.export.export(small, (probe,))
assert torch.allclose(program.module()(probe), small(probe))
print("torch.export.export accepts the exported task")
