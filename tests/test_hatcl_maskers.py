"""HAT-CL's ``ConstantMasker`` (a fixed, non-trainable mask) in this package's terms, as
docs/migration.md gives it: write the 0/1 mask into the task's embedding rows (``+c`` on, ``-c``
off) and train with ``mask_scale=None`` inside ``avalanche_hat.fixed_masks()`` (the explicit opt-in:
outside it such a training forward is refused, as a forgotten mask scale). Binary masks then serve
the training forward too, the embeddings get no gradient, and HAT's protection is the same as with
trained masks."""
from __future__ import annotations

import torch
from torch import nn

import pytest

from avalanche_hat import HATConfig, fixed_masks, forget_task, mark_task_trained, trained_tasks

from test_forgetting import DigitsNet, digit_tasks, evaluate, fit


def set_fixed_mask(layer, task_id, on: torch.Tensor) -> None:
    c = layer.hat_config.embedding_clamp
    with torch.no_grad():
        layer.mask_embedding[task_id] = torch.where(on, torch.tensor(c), torch.tensor(-c))


def test_a_fixed_mask_stays_fixed_learns_and_leaves_earlier_tasks_bit_identical(one_thread):
    torch.manual_seed(0)
    tasks = digit_tasks(((0, 1), (2, 3)))
    model = DigitsNet(HATConfig(num_tasks=2))
    fit(model, 0, *tasks[0][:2])
    before0, acc0 = evaluate(model, 0, *tasks[0][2:])
    assert acc0 >= 0.95

    g = torch.Generator().manual_seed(1)
    chosen = {name: torch.rand(layer.num_units, generator=g) < 0.5 for name, layer in
              (("fc1", model.fc1), ("fc2", model.fc2))}
    for name, on in chosen.items():
        set_fixed_mask(getattr(model, name), 1, on)
    fixed = {name: getattr(model, name).mask_embedding[1].clone() for name in chosen}

    x, y = tasks[1][:2]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    with pytest.raises(ValueError, match=r"mask_scale=None.*avalanche_hat\.fixed_masks\(\)"):
        model(x[:32], 1, None)  # without the opt-in: a forgotten mask scale
    with fixed_masks():
        for _ in range(4):
            for b in range(0, len(x), 32):
                loss = nn.functional.cross_entropy(model(x[b:b + 32], 1, None), y[b:b + 32])  # mask_scale=None
                optimizer.zero_grad()
                loss.backward()
                assert model.fc1.mask_embedding.grad is None or not model.fc1.mask_embedding.grad.any()
                optimizer.step()
    mark_task_trained(model, 1)

    for name, on in chosen.items():
        layer = getattr(model, name)
        assert torch.equal(layer.mask_embedding[1], fixed[name]), f"{name}: the fixed mask moved"
        assert torch.equal(layer.binary_mask(1) > 0, on)
    _, acc1 = evaluate(model, 1, *tasks[1][2:])
    assert acc1 >= 0.9, f"task 1 did not learn with its fixed masks ({acc1:.3f})"
    out0, _ = evaluate(model, 0, *tasks[0][2:])
    assert torch.equal(out0, before0), "task 0 changed"
    # and a task with fixed masks is forgotten like any other
    forget_task(model, 1)
    assert trained_tasks(model) == [0]
    assert torch.equal(evaluate(model, 0, *tasks[0][2:])[0], before0)
