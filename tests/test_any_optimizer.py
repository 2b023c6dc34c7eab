"""Any optimizer keeps the tasks already learned bit-identical (issue 14, item 3).

Eq. 2 zeroes the gradient of what trained tasks own, but an optimizer can still move those weights:
momentum or Adam moments not reset between tasks, weight decay (SGD's, AdamW's, ASGD's built-in
one), state kept in inner optimizers that a reset of ``optimizer.state`` misses. Each case trains
task 0, marks it, keeps the same optimizer for task 1 and compares task 0's outputs with
``torch.equal``. On the code before the restore-after-step guard every one of these drifted.
"""
import pytest
import torch
from torch import nn

import avalanche_hat
from avalanche_hat import HATConfig, HATPayload, hat_regularization, mark_task_trained
from avalanche_hat.modules import HATConv2d, HATLinear, TaskIndexedBatchNorm1d, TaskIndexedBatchNorm2d, TaskIndexedLinear

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """conv, task-indexed BN, a HAT linear layer, a task-indexed BN1d and per-task heads."""

    def __init__(self, cfg):
        super().__init__()
        self.conv = HATConv2d(3, 8, 3, cfg, padding=1)
        self.bn = TaskIndexedBatchNorm2d(8, cfg)
        self.fc = HATLinear(8 * 4, 16, cfg)
        self.bn1d = TaskIndexedBatchNorm1d(16, cfg)
        self.head = TaskIndexedLinear(16, 3, cfg)

    def forward(self, x, task_id, scale=None):
        p = self.bn(self.conv(HATPayload(x, task_id=task_id, mask_scale=scale))).forward_by(nn.ReLU())
        p = p.forward_by(nn.AdaptiveAvgPool2d(2)).flatten(1)
        p = self.bn1d(self.fc(p)).forward_by(nn.ReLU())
        return self.head(p)


class InnerOptimizers(torch.optim.Optimizer):
    """A wrapper whose state lives in two inner optimizers (as Lookahead-style or per-group
    wrappers do): resetting ``wrapper.state`` leaves the inner moments in place."""

    def __init__(self, params):
        params = list(params)
        half = len(params) // 2
        self.inner = [torch.optim.Adam(params[:half], lr=0.01), torch.optim.SGD(params[half:], lr=0.05, momentum=0.9)]
        super().__init__(params, {})

    def step(self, closure=None):
        for opt in self.inner:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.inner:
            opt.zero_grad(set_to_none)


class PlainMomentum:
    """An optimizer outside torch.optim: in-place momentum updates under no_grad, with weight decay."""

    def __init__(self, params, lr=0.05, momentum=0.9, decay=0.01):
        self.params = list(params)
        self.lr, self.momentum, self.decay = lr, momentum, decay
        self.buffers = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        for p, b in zip(self.params, self.buffers):
            g = torch.zeros_like(p) if p.grad is None else p.grad
            b.mul_(self.momentum).add_(g + self.decay * p)
            p.sub_(self.lr * b)

    def zero_grad(self, set_to_none=False):
        for p in self.params:
            p.grad = None


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "sgd_weight_decay": lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=0.05),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "asgd": lambda ps: torch.optim.ASGD(ps, lr=0.05, lambd=0.05),
    "inner_optimizers": InnerOptimizers,
    "outside_torch_optim": PlainMomentum,
}


def data(seed, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model, opt, task, x, y, steps=12, set_to_none=True):
    model.train()
    for i in range(steps):
        scale = 1.0 + 30.0 * i / steps
        opt.zero_grad(set_to_none)
        loss = nn.functional.cross_entropy(model(x, task, scale), y) + 0.1 * hat_regularization(model, task, scale)
        loss.backward()
        opt.step()


@torch.no_grad()
def outputs(model, task, x):
    model.eval()
    return model(x, task)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["grads_none", "grads_zero"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_task_0_is_bit_identical_after_task_1_whatever_the_optimizer(name, set_to_none):
    torch.manual_seed(0)
    model = Net(HATConfig(num_tasks=3, mask_init="normal"))
    opt = OPTIMIZERS[name](model.parameters())  # one optimizer for both tasks, never reset
    (x0, y0), (x1, y1) = data(0), data(1)
    train(model, opt, 0, x0, y0, set_to_none=set_to_none)
    mark_task_trained(model, 0)
    before = outputs(model, 0, x0)
    weight = model.fc.weight.detach().clone()
    train(model, opt, 1, x1, y1, set_to_none=set_to_none)
    assert not torch.equal(model.fc.weight, weight)  # task 1 did train shared weights
    assert torch.equal(outputs(model, 0, x0), before)
    # what task 0 owns besides its units: its head, its norms' running statistics, its mask row
    mark_task_trained(model, 1)
    train(model, opt, 2, *data(2), set_to_none=set_to_none)
    assert torch.equal(outputs(model, 0, x0), before)


def test_retraining_a_trained_task_still_trains_its_own_units_and_protects_the_others():
    torch.manual_seed(0)
    model = Net(HATConfig(num_tasks=3, mask_init="normal"))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    (x0, y0), (x1, y1) = data(0), data(1)
    train(model, opt, 0, x0, y0)
    mark_task_trained(model, 0)
    train(model, opt, 1, x1, y1)
    mark_task_trained(model, 1)
    task1 = outputs(model, 1, x1)
    task0 = outputs(model, 0, x0)
    with avalanche_hat.retraining(0):  # on purpose: a trained task learns again on its own units
        train(model, opt, 0, x0, y0)
    assert not torch.equal(outputs(model, 0, x0), task0)
    assert torch.equal(outputs(model, 1, x1), task1)


def test_the_restore_survives_state_dict_reload_deepcopy_and_a_new_optimizer():
    import copy

    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=3, mask_init="normal")
    model = Net(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    (x0, y0), (x1, y1) = data(0), data(1)
    train(model, opt, 0, x0, y0)
    mark_task_trained(model, 0)
    before = outputs(model, 0, x0)
    fresh = Net(cfg)
    fresh.load_state_dict(model.state_dict())
    twin = copy.deepcopy(fresh)
    for m in (fresh, twin):
        opt = torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1)
        opt.load_state_dict(opt.state_dict())
        train(m, opt, 1, x1, y1, set_to_none=False)
        assert torch.equal(outputs(m, 0, x0), before)
