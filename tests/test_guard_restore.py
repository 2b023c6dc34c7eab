"""The guard's restore kernel (fused_cpu.cpp ``restore_rows``) against the PyTorch formula it
replaces: after it, every protected entry (owned output row, owned input unit) holds the
reference's bits, and every other entry is untouched. Also the layer's tensors moved with ``.to()``
between steps: the reference is taken again for the new dtype and task 0 stays identical."""
import contextlib

import pytest
import torch

from avalanche_hat import HATConfig, HATPayload, mark_task_trained
from avalanche_hat.guard import _owned_spans
from avalanche_hat.mechanism import fused
from avalanche_hat.modules import HATConv2d, HATLinear, TaskIndexedLinear

pytestmark = pytest.mark.usefixtures("one_thread")

kernels = fused.kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="the fused CPU kernels are not built here")


def _condition(out_owned, in_owned, weight):
    trailing = (1,) * (weight.ndim - 2)
    cond = out_owned.view(-1, 1, *trailing)
    if in_owned is not None:
        cond = cond & (in_owned > 0).view(1, -1, *trailing)
    return cond.expand_as(weight)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(37, 23), (12, 7, 3, 3), (5, 4, 1, 1), (9, 41)])
# "some": about half the inputs owned (the kernel reads whole rows against a column mask); "one": a
# single owned input (in (37, 23) and (9, 41) under one column in eight: it visits that column alone)
@pytest.mark.parametrize("inputs", ["unknown", "some", "one", "all", "none"])
def test_restore_kernel_matches_the_formula_bit_for_bit(dtype, shape, inputs):
    g = torch.Generator().manual_seed(len(shape) * 7 + shape[0])
    ref = torch.randn(shape, generator=g, dtype=dtype)
    weight = ref.clone()
    moved = torch.rand(shape, generator=g) < 0.6
    weight[moved] += torch.randn(int(moved.sum()), generator=g, dtype=dtype)
    # bit patterns a value comparison would miss: signed zeros and NaNs in the reference
    ref.view(-1)[::5] = -0.0
    weight.view(-1)[::5] = 0.0
    ref.view(-1)[3::11] = float("nan")
    out_owned = torch.rand(shape[0], generator=g) < 0.5
    in_owned = {"unknown": None, "some": (torch.rand(shape[1], generator=g) < 0.5).float(),
                "one": torch.eye(shape[1])[shape[1] // 2],
                "all": torch.ones(shape[1]), "none": torch.zeros(shape[1])}[inputs]
    cond = _condition(out_owned, in_owned, weight)
    expected = torch.where(cond, ref, weight)
    before = weight.clone()
    rows, cols = _owned_spans(out_owned, in_owned, weight)
    wrote = kernels.restore_rows(weight, ref, rows, cols)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    assert torch.equal(weight.view(bits), expected.view(bits))  # NaNs and -0.0 included
    assert torch.equal(weight[~cond].view(bits), before[~cond].view(bits))
    assert wrote == bool((before.view(bits) != expected.view(bits)).any())


@needs_kernels
def test_restore_kernel_refuses_mismatched_arguments():
    w, ref = torch.zeros(4, 3), torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.restore_rows(w, ref, torch.tensor([4]), torch.empty(0, dtype=torch.long))
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.restore_rows(w, ref, torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(RuntimeError, match="match"):
        kernels.restore_rows(w, torch.zeros(4, 2), torch.tensor([0]), torch.empty(0, dtype=torch.long))


class Net(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.conv = HATConv2d(2, 6, 3, cfg, padding=1)
        self.fc = HATLinear(6 * 16, 12, cfg)
        self.head = TaskIndexedLinear(12, 3, cfg)

    def forward(self, x, task_id, scale=None):
        p = self.conv(HATPayload(x, task_id=task_id, mask_scale=scale)).forward_by(torch.nn.ReLU())
        p = p.forward_by(torch.nn.AdaptiveAvgPool2d(4)).flatten(1)
        return self.head(self.fc(p).forward_by(torch.nn.ReLU()))


def _train(net, task, steps, opt, x, y):
    net.train()
    for i in range(steps):
        opt.zero_grad()
        out = net(x, task, scale=1 + 20 * i)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernel", "pytorch"])
def test_task_0_identical_with_and_without_the_kernel_and_across_to(use_kernels):
    torch.manual_seed(0)
    net = Net(HATConfig(num_tasks=3))
    x, y = torch.randn(16, 2, 8, 8), torch.randint(0, 3, (16,))
    # one optimizer for both tasks, never reset, with decoupled weight decay: only the restore keeps task 0
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    _train(net, 0, 8, opt, x, y)
    mark_task_trained(net, 0)
    net.eval()
    with torch.no_grad():
        before = net(x, 0).clone()
    with (fused.disabled() if not use_kernels else contextlib.nullcontext()):
        _train(net, 1, 4, opt, x, y)
        net.double()  # the layers move between steps: the reference follows them
        opt.state.clear()
        _train(net, 1, 4, opt, x.double(), y)
        net.float()
        opt.state.clear()
        _train(net, 1, 4, opt, x, y)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, 0), before)


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernel", "pytorch"])
def test_owned_biases_restored_when_no_input_unit_is_owned(use_kernels):
    """A layer whose inputs are all free (the previous layer owns nothing for task 0) protects no
    weight entry, but the biases of its owned units still belong to task 0."""
    torch.manual_seed(1)
    cfg = HATConfig(num_tasks=2)
    first, second = HATLinear(5, 6, cfg), HATLinear(6, 4, cfg)
    with torch.no_grad():
        first.mask_embedding[0].fill_(-6.0)   # task 0 owns no unit of the first layer
        second.mask_embedding[0].fill_(6.0)   # and every unit of the second
    mark_task_trained(first, 0)
    mark_task_trained(second, 0)
    bias0, emb0 = second.bias.detach().clone(), second.mask_embedding[0].detach().clone()
    opt = torch.optim.SGD([*first.parameters(), *second.parameters()], lr=0.1, weight_decay=0.5)
    with (fused.disabled() if not use_kernels else contextlib.nullcontext()):
        for i in range(3):
            opt.zero_grad()
            out = second(first(HATPayload(torch.randn(8, 5), task_id=1, mask_scale=10.0 + i)))
            out.data.square().mean().backward()
            opt.step()
    assert torch.equal(second.bias, bias0)
    assert torch.equal(second.mask_embedding[0], emb0)


def test_running_statistics_written_behind_the_layer_are_restored_at_the_next_step():
    """BatchNorm's kernel updates running statistics in place without moving their version
    counters: the restore copies a trained task's buffers back at every step whatever the versions."""
    from test_any_optimizer import Net as BNNet, data, outputs, train

    torch.manual_seed(0)
    net = BNNet(HATConfig(num_tasks=3))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    train(net, opt, 0, *data(0))
    mark_task_trained(net, 0)
    x = data(0)[0]
    expected = outputs(net, 0, x)
    train(net, opt, 1, *data(1), steps=2)
    net.bn.copies[0].train()
    with torch.no_grad():  # straight into task 0's copy, past the layer's checks
        net.bn.copies[0](torch.randn(16, 8, 8, 8) * 5 + 3)
    train(net, opt, 1, *data(1), steps=1)
    assert torch.equal(outputs(net, 0, x), expected)
    for p in (torch.optim.Adam(net.parameters(), lr=0.01, fused=True), torch.optim.SGD(net.parameters(), lr=0.01, foreach=True)):
        train(net, p, 1, *data(1), steps=2)
        assert torch.equal(outputs(net, 0, x), expected)
