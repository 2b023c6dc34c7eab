"""The guarantees users rely on: no forgetting, exact forgetting of one task, the paper's formulas."""
import copy

import pytest
import torch

from avalanche_hat import HATConfig, forget_task, hat_param_groups, trained_tasks

from nets import SmallConvNet, make_tasks, outputs, train_task

# Each makes a fresh optimizer for a model. Adam moves an embedding about lr per step, so the
# embeddings get their own, larger learning rate (see hat_param_groups).
OPTIMIZERS = {
    "sgd_momentum": lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    "adam": lambda model: torch.optim.Adam(hat_param_groups(model, embedding_lr=0.5), lr=0.01),
}


def fit(model, t, x, y, optimizer):
    train_task(model, t, x, y, lambda _params: OPTIMIZERS[optimizer](model), epochs=8, batch=8, reg=0.05)


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def trained(request):
    """A SmallConvNet trained on 3 tasks in turn, with the outputs of each task recorded after it."""
    torch.manual_seed(0)
    model = SmallConvNet(HATConfig(num_tasks=3))
    tasks = make_tasks(3)
    after = {}
    for t, (x, y) in enumerate(tasks):
        fit(model, t, x, y, request.param)
        after[t] = outputs(model, t, tasks[t][0])
    return model, tasks, after


def accuracy(model, t, x, y):
    return (outputs(model, t, x).argmax(1) == y).float().mean().item()


def test_earlier_tasks_bit_identical_after_training_later_tasks(trained):
    model, tasks, after = trained
    for t in (0, 1):
        assert torch.equal(outputs(model, t, tasks[t][0]), after[t]), f"task {t} changed"


def test_tasks_were_actually_learned(trained):
    model, tasks, _ = trained
    for t, (x, y) in enumerate(tasks):
        assert accuracy(model, t, x, y) >= 0.9


def test_later_tasks_reuse_shared_weights(trained):
    """Training task 2 really changed shared weights (the test above is not trivially true)."""
    torch.manual_seed(0)
    model, tasks, _ = trained
    fresh = SmallConvNet(HATConfig(num_tasks=3))
    fit(fresh, 0, *tasks[0], "adam")
    before = copy.deepcopy(fresh.conv2.weight)
    fit(fresh, 1, *tasks[1], "adam")
    assert not torch.equal(before, fresh.conv2.weight)


def test_forgetting_one_task_leaves_others_bit_identical_and_resets_it(trained):
    model, tasks, after = trained
    model = copy.deepcopy(model)
    counts = forget_task(model, 0)
    assert sum(counts.values()) > 0
    assert trained_tasks(model) == [1, 2]
    for t in (1, 2):
        assert torch.equal(outputs(model, t, tasks[t][0]), after[t])
    # Task 0 no longer computes what it learned: it has a fresh task's embeddings (dense: every
    # unit on) and fresh norm copies, so that it can be learned again (test_forgetting.py).
    assert not torch.equal(outputs(model, 0, tasks[0][0]), after[0])
    for name, layer in model.named_modules():
        if hasattr(layer, "mask_embedding"):
            assert torch.equal(layer.mask_embedding[0], torch.ones(layer.num_units)), name
    assert torch.equal(model.bn1.copies[0].running_mean, torch.zeros(model.bn1.copies[0].num_features))
    with pytest.raises(ValueError, match="not marked trained"):
        forget_task(model, 0)
