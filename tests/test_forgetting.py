"""Selective forgetting: a forgotten task id can be learned again (issue 14, item 7), a dry run
changes nothing and reports what the real run does, and the result keeps today's dict."""
from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from avalanche_hat import (CosineMaskScale, ForgetResult, HATConfig, HATPayload, forget_task, hat_regularization,
                           mark_task_trained, recorded_masks, trained_tasks)
from avalanche_hat.modules import HATConv2d, HATLinear, TaskIndexedBatchNorm1d, TaskIndexedLinear

from nets import SmallConvNet, make_tasks, outputs, train_task


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class DigitsNet(nn.Module):
    """Two HAT layers, a task-indexed norm between them and one 2-way head per task."""

    def __init__(self, cfg: HATConfig):
        super().__init__()
        self.fc1, self.bn = HATLinear(64, 48, cfg), TaskIndexedBatchNorm1d(48, cfg)
        self.fc2 = HATLinear(48, 48, cfg)
        self.head = TaskIndexedLinear(48, 2, cfg)
        self.relu = nn.ReLU()

    def forward(self, x, task_id, mask_scale=None):
        p = HATPayload(x, task_id=task_id, mask_scale=mask_scale)
        p = self.bn(self.fc1(p)).forward_by(self.relu)
        p = self.fc2(p).forward_by(self.relu)
        return self.head(p)


def digit_tasks(pairs=((0, 1), (2, 3), (4, 5))):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    tasks = []
    for a, b in pairs:
        idx = torch.nonzero((y == a) | (y == b)).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = len(idx) * 3 // 4
        tasks.append((x[idx[:cut]], (y[idx[:cut]] == b).long(), x[idx[cut:]], (y[idx[cut:]] == b).long()))
    return tasks


def fit(model, t, x, y, epochs=4, batch=32):
    """A HAT-CL-style loop: fresh SGD, cosine schedule per epoch, recorded masks, mark at the end."""
    gen = torch.Generator().manual_seed(100 + t)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule, batches = CosineMaskScale(400.0), (len(x) + batch - 1) // batch
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for b in range(batches):
            i = order[b * batch:(b + 1) * batch]
            s = schedule.at(b, batches)
            with recorded_masks() as masks:
                out = model(x[i], t, s)
            loss = nn.functional.cross_entropy(out, y[i]) + 0.75 * hat_regularization(model, t, s, recorded=masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    mark_task_trained(model, t)


@torch.no_grad()
def evaluate(model, t, x, y):
    model.eval()
    out = model(x, t)
    return out, (out.argmax(1) == y).float().mean().item()


def task_state(model, t):
    """Everything task ``t`` reads that is its own: its embedding rows and its task-indexed copies.
    The embeddings as the clamp to ``[-c, c]`` leaves them (every training forward clamps all rows;
    the last step of a task may leave its row just outside, and that changes no mask)."""
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, HATLinear):
            c = m.hat_config.embedding_clamp
            state[f"{name}.emb"] = m.mask_embedding[t].detach().clamp(-c, c)
        if isinstance(m, (TaskIndexedLinear, TaskIndexedBatchNorm1d)):
            for k, v in m.copies[t].state_dict().items():
                state[f"{name}.{k}"] = v.clone()
    return state


def full_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, f"changed: {changed}"


# ------------------------------------------------------------------------- relearning (item 7)
@pytest.fixture(scope="module")
def three_learned():
    torch.manual_seed(0)
    tasks = digit_tasks()
    model = DigitsNet(HATConfig(num_tasks=3))  # the default mask_init, "dense"
    for t, (x, y, _, _) in enumerate(tasks):
        fit(model, t, x, y)
    return model, tasks


@pytest.mark.parametrize("task", [0, 2])
def test_a_forgotten_task_learns_again_and_the_others_stay_bit_identical(three_learned, task):
    """Task 0 shares all its units with later tasks; task 2 has units of its own, which are freed."""
    model, tasks = three_learned
    model = copy.deepcopy(model)
    before = {t: evaluate(model, t, xt, yt) for t, (_, _, xt, yt) in enumerate(tasks)}
    assert all(acc >= 0.95 for _, acc in before.values()), {t: a for t, (_, a) in before.items()}
    rest = [t for t in range(3) if t != task]
    others = {t: task_state(model, t) for t in rest}

    result = forget_task(model, task)
    assert trained_tasks(model) == rest
    assert (result.units_freed > 0) == (task == 2)
    cfg = model.fc1.hat_config
    for layer in (model.fc1, model.fc2):  # a fresh task's embeddings: HATConfig.mask_init ("dense": 1)
        assert torch.equal(layer.mask_embedding[task], cfg.init_embedding_(torch.empty(layer.num_units)))

    x, y, xt, yt = tasks[task]
    fit(model, task, x, y)
    _, acc = evaluate(model, task, xt, yt)
    assert acc >= 0.9, f"task {task} learned nothing after being forgotten (accuracy {acc:.3f})"
    assert trained_tasks(model) == [0, 1, 2]
    for t in rest:
        out, _ = evaluate(model, t, tasks[t][2], tasks[t][3])
        assert torch.equal(out, before[t][0]), f"task {t}'s outputs changed"
        assert_states_equal(task_state(model, t), others[t])


@pytest.mark.parametrize("mask_init", ["normal", "sparse"])
def test_forgetting_gives_the_task_a_fresh_tasks_embeddings_for_every_mask_init(mask_init):
    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=3, mask_init=mask_init)
    model = DigitsNet(cfg)
    mark_task_trained(model, 0)
    mark_task_trained(model, 1)
    with torch.no_grad():
        model.fc1.mask_embedding[0].fill_(5.0)
        model.fc1.mask_embedding[1].fill_(-5.0)
    kept = model.fc1.mask_embedding[1].clone()
    torch.manual_seed(7)
    forget_task(model, 0)
    torch.manual_seed(7)
    expected = cfg.init_embedding_(torch.empty(model.fc1.num_units))
    if mask_init == "sparse":
        assert torch.equal(model.fc1.mask_embedding[0], expected)
    else:  # a fresh draw from N(0, 1), not the clamp value an erased task used to get
        emb = model.fc1.mask_embedding[0]
        assert emb.std() > 0.5 and emb.abs().max() < 6.0 and not torch.equal(emb, torch.full_like(emb, 5.0))
    assert torch.equal(model.fc1.mask_embedding[1], kept)


def test_the_hat_strategy_relearns_a_forgotten_task():
    from test_training import logits, make_strategy, stacked_data, tensor_benchmark

    bench = tensor_benchmark(3)
    strategy = make_strategy(num_tasks=3, epochs=6)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    model = strategy.model
    x0, y0 = stacked_data(bench.test_stream[0])
    x1, _ = stacked_data(bench.test_stream[1])
    acc_before = (logits(model, x0, 0).argmax(1) == y0).float().mean().item()
    assert acc_before >= 0.9
    task1 = logits(model, x1, 1)

    forget_task(model, 0)
    assert strategy.trained_tasks == [1]
    strategy.train(bench.train_stream[0])  # the strategy accepts it: task 0 is no longer learned
    assert strategy.trained_tasks == [0, 1]
    acc_after = (logits(model, x0, 0).argmax(1) == y0).float().mean().item()
    assert acc_after >= 0.9, f"the strategy marked task 0 trained, but it is at {acc_after:.3f}"
    assert torch.equal(logits(model, x1, 1), task1), "task 1 changed"


def test_forgetting_the_last_trained_task_leaves_no_trace_for_the_next_one():
    """Task 1 was trained last and is forgotten: training task 2 neither warns about task 1 nor
    protects it (it is not a learned task any more)."""
    torch.manual_seed(0)
    tasks = make_tasks(3, n=32)
    model = SmallConvNet(HATConfig(num_tasks=3, mask_init="normal"))
    sgd = lambda params: torch.optim.SGD(params, lr=0.05)  # noqa: E731
    train_task(model, 0, *tasks[0], sgd, epochs=1)
    train_task(model, 1, *tasks[1], sgd, epochs=1)
    forget_task(model, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_task(model, 2, *tasks[2], sgd, epochs=1)
    assert trained_tasks(model) == [0, 2]


def test_a_class_incremental_model_drops_a_forgotten_tasks_classes_and_calibration():
    from avalanche_hat.training import HATClassIncrementalModel
    from cifar_fixtures import TinyHATNet

    cfg = HATConfig(num_tasks=2)
    model = HATClassIncrementalModel(TinyHATNet(cfg), num_classes=4, classes_per_task=2)
    model.register_task(0, [0, 1])
    model.register_task(1, [2, 3])
    with torch.no_grad():
        model.score_mean[0].fill_(3.0)
        model.task_calibrated[:] = True
    mark_task_trained(model, 0)
    mark_task_trained(model, 1)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    forget_task(model, 0)
    assert model.classes_of(0) == [] and not bool(model.task_calibrated[0])
    assert torch.equal(model.score_mean[0], torch.zeros_like(model.score_mean[0]))
    assert model.classes_of(1) == [2, 3] and bool(model.task_calibrated[1])
    model.register_task(0, [0, 1])  # learnable again, with the same classes or others
    for name in ("task_classes", "score_mean", "score_std", "task_calibrated"):
        assert torch.equal(getattr(model, name)[1], kept[name][1])


# --------------------------------------------------------------------------------- dry run
def _conv_model_with_two_tasks():
    torch.manual_seed(0)
    tasks = make_tasks(2, n=32)
    model = SmallConvNet(HATConfig(num_tasks=2, mask_init="normal"))
    for t, (x, y) in enumerate(tasks):
        train_task(model, t, x, y, lambda params: torch.optim.SGD(params, lr=0.05), epochs=2)
    return model, tasks


def test_a_dry_run_changes_nothing_and_reports_what_the_real_run_does(three_learned):
    model, _ = three_learned
    model = copy.deepcopy(model)
    state = full_state(model)
    rng = torch.get_rng_state()
    dry = forget_task(model, 2, dry_run=True)
    assert_states_equal(full_state(model), state)  # every parameter and buffer
    assert torch.equal(torch.get_rng_state(), rng), "a dry run drew random numbers"
    assert trained_tasks(model) == [0, 1, 2]
    assert dry.dry_run and dry.task_id == 2
    assert dry.total > 0 and dry.units_freed > 0

    real = forget_task(model, 2)
    assert not real.dry_run
    assert dict(real) == dict(dry)
    assert real.layers == dry.layers
    assert real.parameters == dry.parameters
    # and the counts say what changed: the freed rows of each HAT layer differ from before
    for name in ("fc1", "fc2"):
        layer = getattr(model, name)
        changed_rows = int((layer.weight != state[f"{name}.weight"]).any(1).sum())
        assert changed_rows <= real.layers[name].units_freed
        assert real.parameters[f"{name}.weight"] == (real.layers[name].units_freed * layer.in_features,
                                                     layer.weight.numel())
    with pytest.raises(ValueError, match="not marked trained"):
        forget_task(model, 2, dry_run=True)


def test_dry_run_on_a_conv_network_with_plain_heads_matches_the_real_run():
    model, _ = _conv_model_with_two_tasks()
    state = full_state(model)
    dry = forget_task(model, 0, dry_run=True)
    assert_states_equal(full_state(model), state)
    real = forget_task(model, 0)
    assert dict(real) == dict(dry) and real.layers == dry.layers
    # the task-indexed norms' copies of task 0 were reset, the others kept
    assert real.layers["bn1"].kind == "task-indexed"
    assert real.parameters["bn1.copies.0.weight"] == (8, 8)
    assert torch.equal(model.bn1.copies[1].weight, state["bn1.copies.1.weight"])
    assert torch.equal(model.bn1.copies[0].running_mean, torch.zeros(8))


# ------------------------------------------------------------------------------- the result
def test_the_result_is_still_the_dict_of_counts_per_layer(three_learned):
    model, _ = three_learned
    model = copy.deepcopy(model)
    res = forget_task(model, 1)
    assert isinstance(res, ForgetResult) and isinstance(res, dict) and isinstance(res, Mapping)
    assert list(res) == ["fc1", "bn", "fc2", "head"]
    assert all(isinstance(v, int) for v in res.values())
    assert res.total == sum(res.values())
    fc1 = res.layers["fc1"]
    assert res["fc1"] == fc1.units_freed * (64 + 1)  # weight rows and biases of the freed units
    assert res["head"] == 48 * 2 + 2
    assert res["bn"] == 2 * 48
    assert res.num_forgotten("fc1") == (res["fc1"] + 48, 64 * 48 + 48 + 3 * 48)  # with its embedding row
    assert res.num_forgotten("head.copies.1.weight") == (96, 96)
    w = res.num_forgotten("weight")
    assert w[0] == sum(f for n, (f, _) in res.parameters.items() if n.endswith(".weight"))
    with pytest.raises(KeyError, match="nope"):
        res.num_forgotten("nope")
    again = pickle.loads(pickle.dumps(res))
    assert again == res and again.layers == res.layers and again.task_id == 1
    assert "fc1" in res.to_markdown() and "units freed" in res.to_markdown()
    assert "task 1" in repr(res)


def test_forgetting_a_hat_conv_layer_alone_counts_its_rows():
    cfg = HATConfig(num_tasks=2, mask_init="normal")
    torch.manual_seed(0)
    conv = HATConv2d(3, 6, 3, cfg)
    with torch.no_grad():
        conv.mask_embedding[0] = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, 1.0])
        conv.mask_embedding[1] = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, -1.0])
    mark_task_trained(conv, 0)
    mark_task_trained(conv, 1)
    res = forget_task(conv, 0, dry_run=True)
    assert res.layers[""].units_freed == 3  # units 1, 2, 5: task 1 has them off
    assert res[""] == 3 * (3 * 3 * 3) + 3
