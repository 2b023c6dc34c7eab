"""Task-indexed norms keep HAT's guarantee in every position a network can put them.

A norm whose statistics reduce over the axis a pending mask lies on (a LayerNorm over the features
of a HATLinear, over (C, H, W) of a HATConv2d, a GroupNorm, a BatchNorm1d over the positions a
HATLinear masks) would mix in units the task does not use, which later tasks train. Each case below
trains task 0, switches half of its units off, marks it trained, trains task 1 (fresh SGD) and
checks that task 0's outputs (binary masks, eval mode) are bit-identical and that task 1 really
changed the weights the two tasks share.
"""
import copy

import pytest
import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload, fixed_masks, mark_task_trained
from avalanche_hat.modules import (
    HATConv1d,
    HATConv2d,
    HATLinear,
    TaskIndexedBatchNorm1d,
    TaskIndexedBatchNorm2d,
    TaskIndexedGroupNorm,
    TaskIndexedLayerNorm,
    from_base_module,
)

CFG = HATConfig(num_tasks=2)


class Net(nn.Module):
    """``layers`` run by ``route(layers, payload)``; the output is the final payload's data."""

    def __init__(self, route, **layers):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.route = route

    def forward(self, payload):
        return self.route(self.layers, payload).data


def seq(*names):
    def route(m, p):
        for name in names:
            p = m[name](p) if isinstance(m[name], (HATLinear, HATConv1d, HATConv2d)) or hasattr(m[name], "copies") \
                else p.forward_by(m[name])
        return p
    return route


def token_linear(i, o):
    from avalanche_hat.timm_models.vit import HATTokenLinear  # imports timm: only when used

    layer = HATTokenLinear(i, o, CFG)
    layer.fold_mask = True
    return layer


# name: (input shape, builder); every builder makes a fresh network from CFG.
CASES = {
    # a norm directly after a HAT layer, reducing over the mask's axis
    "linear>layernorm": ((6, 5), lambda: Net(seq("a", "n"), a=HATLinear(5, 8, CFG), n=TaskIndexedLayerNorm(8, CFG))),
    "linear>layernorm tokens (N,L,C)": ((6, 4, 5), lambda: Net(
        seq("a", "n"), a=HATLinear(5, 8, CFG), n=TaskIndexedLayerNorm(8, CFG))),
    "linear>layernorm no affine": ((6, 5), lambda: Net(
        seq("a", "n"), a=HATLinear(5, 8, CFG), n=TaskIndexedLayerNorm(8, CFG, elementwise_affine=False))),
    "linear>layernorm no bias": ((6, 5), lambda: Net(
        seq("a", "n"), a=HATLinear(5, 8, CFG), n=TaskIndexedLayerNorm(8, CFG, bias=False))),
    "conv2d>layernorm (C,H,W)": ((6, 3, 5, 5), lambda: Net(
        seq("a", "n"), a=HATConv2d(3, 4, 3, CFG, padding=1), n=TaskIndexedLayerNorm((4, 5, 5), CFG))),
    "conv1d>layernorm (C,L)": ((6, 3, 7), lambda: Net(
        seq("a", "n"), a=HATConv1d(3, 4, 3, CFG, padding=1), n=TaskIndexedLayerNorm((4, 7), CFG))),
    "conv2d>flatten>layernorm": ((6, 3, 4, 4), lambda: Net(
        lambda m, p: m["n"](m["a"](p).flatten(1)), a=HATConv2d(3, 4, 3, CFG, padding=1),
        n=TaskIndexedLayerNorm(64, CFG))),
    "linear on (N,C,L)>layernorm (C,L)": ((6, 3, 5), lambda: Net(
        seq("a", "n"), a=HATLinear(5, 8, CFG), n=TaskIndexedLayerNorm((3, 8), CFG))),
    "conv2d>groupnorm": ((6, 3, 5, 5), lambda: Net(
        seq("a", "n"), a=HATConv2d(3, 8, 3, CFG, padding=1), n=TaskIndexedGroupNorm(2, 8, CFG))),
    "conv2d>groupnorm per channel": ((6, 3, 5, 5), lambda: Net(
        seq("a", "n"), a=HATConv2d(3, 8, 3, CFG, padding=1), n=TaskIndexedGroupNorm(8, 8, CFG))),
    "linear>groupnorm (N,C)": ((6, 5), lambda: Net(
        seq("a", "n"), a=HATLinear(5, 8, CFG), n=TaskIndexedGroupNorm(4, 8, CFG))),
    "linear on (N,C,L)>groupnorm": ((6, 4, 5), lambda: Net(
        seq("a", "n"), a=HATLinear(5, 8, CFG), n=TaskIndexedGroupNorm(2, 4, CFG))),
    "linear on (N,C,L)>batchnorm1d": ((6, 3, 5), lambda: Net(
        seq("a", "n"), a=HATLinear(5, 8, CFG), n=TaskIndexedBatchNorm1d(3, CFG))),
    "linear on (N,C,L)>batchnorm1d no running stats": ((6, 3, 5), lambda: Net(
        seq("a", "n"), a=HATLinear(5, 8, CFG), n=TaskIndexedBatchNorm1d(3, CFG, track_running_stats=False))),
    # per-unit statistics along the mask's axis: the mask folds into the affine parameters
    "conv2d>batchnorm2d": ((6, 3, 5, 5), lambda: Net(
        seq("a", "n"), a=HATConv2d(3, 4, 3, CFG, padding=1), n=TaskIndexedBatchNorm2d(4, CFG))),
    "conv2d>batchnorm2d no running stats": ((6, 3, 5, 5), lambda: Net(
        seq("a", "n"), a=HATConv2d(3, 4, 3, CFG, padding=1), n=TaskIndexedBatchNorm2d(4, CFG, track_running_stats=False))),
    "linear>batchnorm1d (N,C)": ((6, 5), lambda: Net(
        seq("a", "n"), a=HATLinear(5, 8, CFG), n=TaskIndexedBatchNorm1d(8, CFG))),
    "conv1d>batchnorm1d (N,C,L)": ((6, 3, 7), lambda: Net(
        seq("a", "n"), a=HATConv1d(3, 4, 3, CFG, padding=1), n=TaskIndexedBatchNorm1d(4, CFG))),
    "conv2d>layernorm (H,W)": ((6, 3, 5, 5), lambda: Net(
        seq("a", "n"), a=HATConv2d(3, 4, 3, CFG, padding=1), n=TaskIndexedLayerNorm((5, 5), CFG))),
    "linear tokens>transpose>batchnorm1d": ((6, 4, 5), lambda: Net(
        lambda m, p: m["n"](m["a"](p).transpose(1, 2)), a=HATLinear(5, 8, CFG), n=TaskIndexedBatchNorm1d(8, CFG))),
    # after an activation: ReLU keeps the mask pending, GELU applies it
    "linear>relu>layernorm": ((6, 5), lambda: Net(
        seq("a", "r", "n"), a=HATLinear(5, 8, CFG), r=nn.ReLU(), n=TaskIndexedLayerNorm(8, CFG))),
    "linear>gelu>layernorm": ((6, 5), lambda: Net(
        seq("a", "r", "n"), a=HATLinear(5, 8, CFG), r=nn.GELU(), n=TaskIndexedLayerNorm(8, CFG))),
    "conv2d>relu>maxpool>layernorm (C,H,W)": ((6, 3, 6, 6), lambda: Net(
        seq("a", "r", "p", "n"), a=HATConv2d(3, 4, 3, CFG, padding=1), r=nn.ReLU(), p=nn.MaxPool2d(2),
        n=TaskIndexedLayerNorm((4, 3, 3), CFG))),
    "conv2d>relu>groupnorm": ((6, 3, 5, 5), lambda: Net(
        seq("a", "r", "n"), a=HATConv2d(3, 8, 3, CFG, padding=1), r=nn.ReLU(), n=TaskIndexedGroupNorm(2, 8, CFG))),
    # the norm's output feeding another HAT layer (its ownership carries over)
    "linear>layernorm>linear": ((6, 5), lambda: Net(
        seq("a", "n", "b"), a=HATLinear(5, 8, CFG), n=TaskIndexedLayerNorm(8, CFG), b=HATLinear(8, 6, CFG))),
    "conv2d>groupnorm>relu>conv2d": ((6, 3, 5, 5), lambda: Net(
        seq("a", "n", "r", "b"), a=HATConv2d(3, 8, 3, CFG, padding=1), n=TaskIndexedGroupNorm(4, 8, CFG),
        r=nn.ReLU(), b=HATConv2d(8, 4, 3, CFG, padding=1))),
    # after a residual add (each operand's mask applied), and pre-norm as in a ViT block
    "residual add>layernorm": ((6, 8), lambda: Net(
        lambda m, p: m["n"](m["b"](m["a"](p)) + m["a"](p)), a=HATLinear(8, 8, CFG), b=HATLinear(8, 8, CFG),
        n=TaskIndexedLayerNorm(8, CFG))),
    "pre-norm block (ViT)": ((6, 4, 8), lambda: Net(
        lambda m, p: (lambda x: x + m["b"](m["n2"](x)))(m["e"](p) + m["a"](m["n1"](m["e"](p)))),
        e=HATLinear(8, 8, CFG), n1=TaskIndexedLayerNorm(8, CFG), a=HATLinear(8, 8, CFG),
        n2=TaskIndexedLayerNorm(8, CFG), b=HATLinear(8, 8, CFG))),
    "pre-norm on the input": ((6, 4, 8), lambda: Net(
        seq("n", "a"), n=TaskIndexedLayerNorm(8, CFG), a=HATLinear(8, 8, CFG))),
    "conv2d>groupnorm residual": ((6, 4, 5, 5), lambda: Net(
        lambda m, p: m["n2"](m["n"](m["a"](p)) + m["b"](p)), a=HATConv2d(4, 4, 3, CFG, padding=1),
        n=TaskIndexedGroupNorm(2, 4, CFG), b=HATConv2d(4, 4, 1, CFG), n2=TaskIndexedGroupNorm(2, 4, CFG))),
    # a HAT layer that applied its mask itself (folded into its weight): the norm gets exact zeros
    "token linear (mask folded)>layernorm": ((6, 4, 5), lambda: Net(
        seq("a", "n"), a=token_linear(5, 8), n=TaskIndexedLayerNorm(8, CFG))),
    # a plain norm without parameters or running statistics (a plain norm with them is refused below)
    "linear>plain layernorm without affine": ((6, 5), lambda: Net(
        seq("a", "n"), a=HATLinear(5, 8, CFG), n=nn.LayerNorm(8, elementwise_affine=False))),
    "conv2d>relu>plain groupnorm without affine": ((6, 3, 5, 5), lambda: Net(
        seq("a", "r", "n"), a=HATConv2d(3, 8, 3, CFG, padding=1), r=nn.ReLU(), n=nn.GroupNorm(2, 8, affine=False))),
}


def hat_layers(net):
    return [m for m in net.modules() if hasattr(m, "mask_embedding")]


def train(net, x, task_id, steps=6, lr=0.2):
    torch.manual_seed(100 + task_id)
    with torch.no_grad():  # the output's shape (a fresh module is in training mode)
        target = torch.randn_like(net(HATPayload(x, task_id=task_id)))
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)  # a fresh optimizer per task
    net.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (net(HATPayload(x, task_id=task_id, mask_scale=400.0)) - target).pow(2).mean()
        loss.backward()
        optimizer.step()


def outputs(net, x, task_id):
    net.eval()
    with torch.no_grad():
        return net(HATPayload(x, task_id=task_id))


@pytest.mark.parametrize("case", sorted(CASES))
def test_task_0_is_bit_identical_after_task_1_trains(case, one_thread):
    shape, build = CASES[case]
    torch.manual_seed(0)
    net = build()
    x = torch.randn(*shape)
    train(net, x, 0)
    with torch.no_grad():  # task 0 keeps every other unit: the rest is free for task 1
        for m in hat_layers(net):
            m.mask_embedding[0, ::2] = -CFG.embedding_clamp
    mark_task_trained(net, 0)
    before = outputs(net, x, 0)
    weights = [m.weight.detach().clone() for m in hat_layers(net)]
    train(net, x, 1)
    after = outputs(net, x, 0)
    assert torch.isfinite(before).all()
    assert torch.equal(before, after), f"task 0 drifted by {(before - after).abs().max().item():.3g}"
    # the check above is not trivially true: task 1 trained the weights both tasks' layers hold
    moved = [not torch.equal(w, m.weight) for w, m in zip(weights, hat_layers(net))]
    assert all(moved), moved
    assert not torch.equal(outputs(net, x, 1), after)


# ------------------------------------------------------------------------ the statistics themselves
# (norm, input shape, mask axis): the mask (binary, every other unit) lies on that axis of the input.
LAYOUTS = {
    "layernorm last axis": (lambda: TaskIndexedLayerNorm(8, CFG), (4, 3, 8), 2),
    "layernorm (C,H,W)": (lambda: TaskIndexedLayerNorm((4, 3, 3), CFG), (5, 4, 3, 3), 1),
    "layernorm (H,W), mask on C": (lambda: TaskIndexedLayerNorm((3, 3), CFG), (5, 4, 3, 3), 1),
    "groupnorm, mask on C": (lambda: TaskIndexedGroupNorm(2, 4, CFG), (5, 4, 3, 3), 1),
    "groupnorm, mask on W": (lambda: TaskIndexedGroupNorm(2, 4, CFG), (5, 4, 3, 6), 3),
    "batchnorm1d, mask on C": (lambda: TaskIndexedBatchNorm1d(4, CFG), (5, 4, 6), 1),
    "batchnorm1d, mask on L": (lambda: TaskIndexedBatchNorm1d(4, CFG), (5, 4, 6), 2),
    "batchnorm2d, mask on C": (lambda: TaskIndexedBatchNorm2d(4, CFG), (5, 4, 3, 3), 1),
    "batchnorm2d, mask on W": (lambda: TaskIndexedBatchNorm2d(4, CFG), (5, 4, 3, 6), 3),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_statistics_depend_only_on_the_units_the_task_uses(layout, training):
    """Whatever the units the mask switches off hold, the outputs (and the running statistics a
    training forward leaves) are the same, and those units come out as exact zeros."""
    build, shape, axis = LAYOUTS[layout]
    torch.manual_seed(0)
    norm = build()
    mask = torch.zeros(shape[axis])
    mask[1::2] = 1.0
    view = [1] * len(shape)
    view[axis] = -1
    off = (mask == 0).view(view).expand(shape)
    x = torch.randn(*shape)
    y = torch.where(off, 100 * torch.randn(*shape) + 7, x)  # other values in the switched-off units
    results = []
    for data in (x, y):
        n = copy.deepcopy(norm).train(training)
        out = n(HATPayload(data, task_id=0, mask=mask, mask_dim=axis)).data
        state = {k: v for k, v in n.copies[0].state_dict().items()}
        results.append((out, state))
    (out_x, state_x), (out_y, state_y) = results
    assert torch.equal(out_x, out_y)
    assert not out_x[off].any()
    for k in state_x:
        a, b = state_x[k], state_y[k]
        if axis == 1 and a.ndim == 1 and a.numel() == shape[1]:
            # per-channel state of a norm whose statistics are per channel: the switched-off
            # channels' entries only ever meet a zero mask
            a, b = a[mask > 0], b[mask > 0]
        assert torch.equal(a, b), k


# --------------------------------------------------------------------------------- what it computes
def test_layer_norm_normalises_the_masked_output_then_masks_again():
    """Switched-off units enter the statistics as exact zeros (what ``LayerNorm(mask * h)`` computes)
    and stay zero after the norm."""
    lin = HATLinear(6, 8, CFG)
    ln = TaskIndexedLayerNorm(8, CFG)
    with torch.no_grad():
        lin.mask_embedding[0, :3] = -2.0
        for p in ln.copies[0].parameters():
            p.uniform_(0.5, 1.5)
    for scale in (3.0, None):
        with fixed_masks():  # mask_scale=None in training mode: fixed (binary) masks, on purpose
            p = lin(HATPayload(torch.randn(2, 3, 6), task_id=0, mask_scale=scale))
        expected = ln.copies[0](p.data) * p.pending_mask
        torch.testing.assert_close(ln(p).data, expected)


def test_group_norm_matches_torch_and_the_plain_network():
    plain = nn.GroupNorm(2, 6)
    with torch.no_grad():
        plain.weight.uniform_(), plain.bias.uniform_()
    gn = from_base_module(plain, CFG)
    assert isinstance(gn, TaskIndexedGroupNorm)
    x = torch.randn(3, 6, 4, 4)
    for t in (None, 0, 1):
        assert torch.equal(gn(HATPayload(x, task_id=t)).data, plain(x))
    conv = HATConv2d(2, 6, 1, CFG).eval()  # binary masks (a fresh module is in training mode)
    with torch.no_grad():
        conv.mask_embedding[1, :2] = -1.0
    p = conv(HATPayload(torch.randn(3, 2, 4, 4), task_id=1))
    m = p.pending_mask.view(1, -1, 1, 1)
    torch.testing.assert_close(gn(p).data, plain(p.data) * m)
    state = gn.expand_plain_state(plain.state_dict())
    assert set(state) == {f"copies.{i}.{k}" for i in range(CFG.num_tasks + 1) for k in ("weight", "bias")}


def test_group_norm_copies_are_independent_and_forgettable():
    gn = TaskIndexedGroupNorm(2, 4, CFG)
    with torch.no_grad():
        gn.copies[0].weight.fill_(3.0)
    assert torch.equal(gn.copies[1].weight, torch.ones(4))
    assert gn.forget(0) == 8
    assert torch.equal(gn.copies[0].weight, torch.ones(4))
    assert "2, 4, num_tasks=2" in repr(gn)


# ----------------------------------------------------------------------------------- plain norms
@pytest.mark.parametrize("norm,shape", [
    (nn.BatchNorm2d(4), (2, 4, 3, 3)),
    (nn.BatchNorm1d(4, affine=False), (2, 4)),  # running statistics alone are shared state too
    (nn.LayerNorm(4), (2, 4)),
    (nn.GroupNorm(2, 4), (2, 4, 3, 3)),
    (nn.InstanceNorm2d(4, affine=True), (2, 4, 3, 3)),
    (nn.RMSNorm(4), (2, 4)),
], ids=["BatchNorm2d", "BatchNorm1d running stats only", "LayerNorm", "GroupNorm", "InstanceNorm2d", "RMSNorm"])
def test_a_plain_norm_with_state_in_a_task_forward_is_refused(norm, shape):
    """Its parameters or running statistics would be shared by every task: refused before it runs
    (nothing updated), with what to use instead; the plain network (task_id=None) may use it."""
    x = torch.randn(*shape)
    before = copy.deepcopy(norm.state_dict())
    norm.train()
    with pytest.raises(TypeError, match=rf"plain {type(norm).__name__} in the forward of task 1 .*(task-indexed|TaskIndexed)"):
        HATPayload(x, task_id=1, mask_scale=4.0).forward_by(norm)
    assert all(torch.equal(v, norm.state_dict()[k]) for k, v in before.items())
    assert HATPayload(x).forward_by(norm).shape == x.shape

