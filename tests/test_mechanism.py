"""The paper's equations, checked against hand computation."""
import math

import pytest
import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload, fixed_masks, hat_regularization, mark_task_trained
from avalanche_hat.mechanism import CosineMaskScale, LinearMaskScale, ConstantMaskScale, make_schedule, soft_mask
from avalanche_hat.modules import HATLinear

S_MAX = 400.0


class TinyMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = HATLinear(3, 4, cfg)
        self.fc2 = HATLinear(4, 2, cfg)

    def forward(self, x, t, s):
        p = self.fc1(HATPayload(x, task_id=t, mask_scale=s)).forward_by(nn.ReLU())
        return self.fc2(p).data


def test_gradients_equal_the_papers_formulas_by_hand(hat_kernels):
    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=2, max_mask_scale=S_MAX)
    net = TinyMLP(cfg).double()
    with torch.no_grad():  # task 0 owns units 0, 2 of fc1 and unit 0 of fc2
        net.fc1.mask_embedding[0] = torch.tensor([2.0, -1.0, 0.5, -3.0])
        net.fc2.mask_embedding[0] = torch.tensor([1.0, -2.0])
        net.fc1.mask_embedding[1] = torch.tensor([0.3, -0.2, 1.5, -0.7])
        net.fc2.mask_embedding[1] = torch.tensor([-0.4, 0.9])
    mark_task_trained(net, 0)
    x = torch.randn(64, 3, dtype=torch.float64)
    c = torch.randn(64, 2, dtype=torch.float64)
    s = 2.5
    (net(x, 1, s) * c).sum().backward()

    # The same computation with plain tensors and autograd, then the paper's factors by hand.
    W1, b1 = net.fc1.weight.detach().clone().requires_grad_(), net.fc1.bias.detach().clone().requires_grad_()
    W2, b2 = net.fc2.weight.detach().clone().requires_grad_(), net.fc2.bias.detach().clone().requires_grad_()
    e1 = net.fc1.mask_embedding.detach()[1].clone().requires_grad_()
    e2 = net.fc2.mask_embedding.detach()[1].clone().requires_grad_()
    z1 = torch.relu((x @ W1.T + b1) * torch.sigmoid(s * e1))
    out = (z1 @ W2.T + b2) * torch.sigmoid(s * e2)
    (out * c).sum().backward()
    own1 = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # a^{<1} of fc1
    own2 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    ones_in = torch.ones(3, dtype=torch.float64)  # the input layer counts as owned
    eq2_w1 = 1 - torch.minimum(own1[:, None], ones_in[None, :])
    eq2_w2 = 1 - torch.minimum(own2[:, None], own1[None, :])

    def eq3(e, q):  # |s e| < 50 here, so the original code's clamp does not act
        assert (s * e).abs().max() < 50
        return S_MAX * (torch.cosh(s * e) + 1) / (s * (torch.cosh(e) + 1)) * q

    torch.testing.assert_close(net.fc1.weight.grad, W1.grad * eq2_w1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.fc1.bias.grad, b1.grad * (1 - own1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.fc2.weight.grad, W2.grad * eq2_w2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.fc2.bias.grad, b2.grad * (1 - own2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.fc1.mask_embedding.grad[1], eq3(e1.detach(), e1.grad), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net.fc2.mask_embedding.grad[1], eq3(e2.detach(), e2.grad), rtol=1e-10, atol=1e-12)
    # Task 0's embeddings are not trained while learning task 1.
    assert torch.count_nonzero(net.fc1.mask_embedding.grad[0]) == 0
    # Eq. 2 really freezes something here, so the comparison above is not vacuous.
    frozen = eq2_w2 == 0
    assert (W2.grad[frozen] != 0).any() and (net.fc2.weight.grad[frozen] == 0).all()
    # Owned output unit 0, unowned inputs 1 and 3: trainable under the min rule.
    assert (net.fc2.weight.grad[0, [1, 3]] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compensated_gradient_is_finite_in_half_precision(dtype):
    e = torch.linspace(-6, 6, 101, dtype=dtype).requires_grad_()
    for s in (0.0, 1e-3, 1.0, 400.0):
        e.grad = None
        soft_mask(e, s, S_MAX).backward(torch.ones_like(e))
        assert e.grad.dtype == dtype
        assert torch.isfinite(e.grad).all(), f"non-finite compensated gradient at s={s}"
        ed = e.detach().double()
        # The original code's factor with cosh(s e) clamped at 50, in float64.
        num = torch.cosh((s * ed).clamp(-50, 50)) + 1
        ref = S_MAX / (2 * (torch.cosh(ed) + 1)) * num / (torch.cosh(s * ed) + 1)
        torch.testing.assert_close(e.grad.double(), ref, rtol=2e-2, atol=1e-3)
    # The literal formula overflows in this precision (what the published package does).
    big = torch.tensor(S_MAX, dtype=dtype) * (torch.cosh(torch.tensor(400.0 * 6.0, dtype=dtype)) + 1)
    assert not torch.isfinite(big)


def test_saturated_masks_stop_training_as_in_the_original_code():
    e = torch.tensor([0.05, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    soft_mask(e, 400.0, S_MAX).backward(torch.ones(3, dtype=torch.float64))
    assert e.grad[0] > 1.0  # |s e| = 20: trains at full compensated speed
    assert e.grad[1] < 1e-60 and e.grad[2] == 0  # |s e| = 200, 1200: saturated
    e.grad = None
    soft_mask(e, 400.0, S_MAX, saturation=None).backward(torch.ones(3, dtype=torch.float64))
    assert (e.grad > 0.9).all()


def test_half_precision_layer_trains_with_finite_gradients():
    cfg = HATConfig(num_tasks=2)
    layer = HATLinear(8, 8, cfg).to(torch.bfloat16)
    out = layer(HATPayload(torch.randn(4, 8, dtype=torch.bfloat16), task_id=0, mask_scale=400.0))
    out.data.float().pow(2).sum().backward()
    assert torch.isfinite(layer.mask_embedding.grad).all() and torch.isfinite(layer.weight.grad).all()


def test_embeddings_are_clamped_in_training(hat_kernels):
    cfg = HATConfig(num_tasks=1, embedding_clamp=6.0)
    layer = HATLinear(2, 3, cfg)
    with torch.no_grad():
        layer.mask_embedding[0] = torch.tensor([10.0, -10.0, 3.0])
    layer(HATPayload(torch.randn(1, 2), task_id=0, mask_scale=1.0))
    assert layer.mask_embedding[0].tolist() == [6.0, -6.0, 3.0]


def test_schedules_follow_equations_4_and_6():
    cos, lin = CosineMaskScale(S_MAX), LinearMaskScale(S_MAX)
    assert cos(0.0) == pytest.approx(S_MAX) and cos(0.5) == pytest.approx(0.0, abs=1e-9) and cos(1.0) == pytest.approx(S_MAX)
    assert cos(0.25) == pytest.approx(S_MAX / 2)
    # Eq. 4 with b = 1..B: s = 1/s_max + (s_max - 1/s_max)(b - 1)/(B - 1)
    B = 7
    for b in range(1, B + 1):
        assert lin.at(b - 1, B) == pytest.approx(1 / S_MAX + (S_MAX - 1 / S_MAX) * (b - 1) / (B - 1))
    assert ConstantMaskScale(3.0).at(5, 9) == 3.0
    assert isinstance(make_schedule("linear", 10.0), LinearMaskScale)
    with pytest.raises(ValueError, match="unknown mask-scale schedule"):
        make_schedule("exp", 10.0)


def test_layerwise_regularization_is_equation_5():
    cfg = HATConfig(num_tasks=4)
    net = TinyMLP(cfg)
    with torch.no_grad():
        net.fc1.mask_embedding[0] = torch.tensor([1.0, -1.0, 1.0, -1.0])
        net.fc2.mask_embedding[0] = torch.tensor([-1.0, -1.0])
    mark_task_trained(net, 0)
    s = 0.7
    reg = hat_regularization(net, 1, s)
    expected = 0.0
    for layer in (net.fc1, net.fc2):
        a = torch.sigmoid(s * layer.mask_embedding[1].detach())
        prev = (layer.mask_embedding[0] > 0).float()
        expected += max((a * (1 - prev)).sum().item() / (1 - prev).sum().item() - 1 / 4, 0.0)
    assert reg.item() == pytest.approx(expected, rel=1e-6)
    glob = hat_regularization(net, 1, s, kind="global")
    num = sum((torch.sigmoid(s * l.mask_embedding[1].detach()) * (l.mask_embedding[0] <= 0)).sum() for l in (net.fc1, net.fc2))
    den = sum((l.mask_embedding[0] <= 0).sum() for l in (net.fc1, net.fc2))
    assert glob.item() == pytest.approx((num / den).item(), rel=1e-6)


def test_mask_inits():
    for init, check in (("dense", lambda e: bool((e == 1).all())), ("sparse", lambda e: bool((e == -1).all())),
                        ("normal", lambda e: 0.5 < e.std().item() < 1.5)):
        layer = HATLinear(4, 256, HATConfig(num_tasks=2, mask_init=init))
        assert check(layer.mask_embedding.detach()), init


def test_dense_init_with_cosine_schedule_finds_the_useful_features_fast():
    """HAT-CL Table 1's claim on a few networks (the full run is benchmarks/table1_mask_init.py)."""
    import importlib.util
    import pathlib
    import statistics

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "table1_mask_init.py"
    spec = importlib.util.spec_from_file_location("table1_mask_init", path)
    table1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table1)
    ours = [table1.batches_to_train("ours", seed, max_batches=300) for seed in range(4)]
    original = [table1.batches_to_train("original", seed, max_batches=300) for seed in range(4)]
    assert statistics.mean(ours) < 60
    assert statistics.mean(ours) < statistics.mean(original)


@pytest.mark.parametrize("samples", [2, 64])  # fewer and more samples than inputs: both code paths
@pytest.mark.parametrize("input_ownership", [False, True])
def test_fused_linear_gradients_are_equation_2(samples, input_ownership):
    from avalanche_hat.mechanism.masks import nullified_linear

    torch.manual_seed(0)
    x = torch.randn(samples, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    out_owned = torch.tensor([1.0, 0, 1, 0, 0], dtype=torch.float64)
    in_owned = (torch.arange(8) % 3 == 0).double() if input_ownership else None
    c = torch.randn(samples, 5, dtype=torch.float64)
    (nullified_linear(x, w, b, out_owned, in_owned) * c).sum().backward()
    gx, gw, gb = x.grad, w.grad, b.grad
    x.grad = w.grad = b.grad = None
    (torch.nn.functional.linear(x, w, b) * c).sum().backward()
    owned_in = in_owned if in_owned is not None else torch.ones(8, dtype=torch.float64)
    torch.testing.assert_close(gw, w.grad * (1 - torch.minimum(out_owned[:, None], owned_in[None, :])))
    torch.testing.assert_close(gb, b.grad * (1 - out_owned))
    torch.testing.assert_close(gx, x.grad)  # the input gradient is never nullified


@pytest.mark.parametrize("trained", [[], [0], [0, 2], [0, 1, 2, 3]])
@pytest.mark.parametrize("task_id", [None, 0, 1, 3])
def test_ownership_is_the_max_of_the_other_trained_tasks_binary_masks(trained, task_id):
    """Eq. 2's a^{<t}, by both ways of computing it (the CPU's list of tasks; the device's product)."""
    from avalanche_hat.mechanism.masks import ownership

    torch.manual_seed(0)
    emb = torch.randn(4, 12, dtype=torch.float64)
    flags = torch.zeros(4, dtype=torch.bool)
    flags[trained] = True
    expected = torch.zeros(12, dtype=torch.float64)
    for t in trained:
        if t != task_id:
            expected = torch.maximum(expected, (emb[t] > 0).double())
    for by_list in (True, False):
        got = ownership(emb, flags, task_id, by_list)
        assert got.dtype == emb.dtype and torch.equal(got, expected), by_list


@pytest.mark.parametrize("owned_rows", [[], [4], [0, 2, 5], list(range(9))])  # none, few, a third+, all
@pytest.mark.parametrize("inputs", ["unknown", "mixed", "all owned"])
@pytest.mark.parametrize("by_index", [True, False])  # the CPU's index path and the masked one
def test_every_weight_gradient_path_is_equation_2(owned_rows, inputs, by_index):
    """Eq. 2 takes different paths by device and by how much of the layer is owned (skipping the
    product of frozen rows, zeroing owned rows by index, one masked pass): all give the formula."""
    from avalanche_hat.mechanism.masks import _nullified_weight_grad, nullify_linear_grad_

    torch.manual_seed(0)
    g, x = torch.randn(7, 9, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    out_owned = torch.zeros(9, dtype=torch.float64)
    out_owned[owned_rows] = 1.0
    in_owned = {"unknown": None, "mixed": torch.tensor([1.0, 0, 0, 1, 1, 0], dtype=torch.float64),
                "all owned": torch.ones(6, dtype=torch.float64)}[inputs]
    owned_in = torch.ones(6, dtype=torch.float64) if in_owned is None else in_owned
    expected = g.t().mm(x) * (1 - torch.minimum(out_owned[:, None], owned_in[None, :]))
    got = _nullified_weight_grad(g, x, out_owned, in_owned, by_index)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert got.shape == (9, 6) and got.is_contiguous()
    torch.testing.assert_close(nullify_linear_grad_(g.t().mm(x), out_owned, in_owned, by_index), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("scale", [0.5, 40.0])  # at 40, |s e| passes the saturation clamp of 50
def test_one_node_linear_step_equals_layer_plus_soft_mask(compensate, scale):
    """HATLinear's training step runs as one autograd node; it must compute what the separate
    pieces (linear with Eq. 2, then the soft mask with or without Eq. 3) compute."""
    from avalanche_hat.mechanism.masks import masked_nullified_linear, nullified_linear

    torch.manual_seed(0)
    emb = (torch.randn(3, 6, dtype=torch.float64) * 3).requires_grad_()
    x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    owned = torch.tensor([1.0, 0, 0, 1, 0, 0], dtype=torch.float64)
    c = torch.randn(10, 6, dtype=torch.float64)
    out, mask = masked_nullified_linear(x, w, b, emb, owned, None, 1, scale, S_MAX, compensate, 50.0)
    (out * mask * c).sum().backward()
    fused = [t.grad.clone() for t in (x, w, b, emb)]
    for t in (x, w, b, emb):
        t.grad = None
    ref_mask = soft_mask(emb[1], scale, S_MAX, compensate, 50.0)
    (nullified_linear(x, w, b, owned, None) * ref_mask * c).sum().backward()
    for got, t in zip(fused, (x, w, b, emb)):
        torch.testing.assert_close(got, t.grad, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(fused[3][[0, 2]]) == 0 and torch.count_nonzero(fused[3][1]) > 0
    if not compensate:  # then it is the plain derivative of sigmoid(s e)
        e = emb.detach()[1].clone().requires_grad_()
        (torch.sigmoid(scale * e) * (out.detach() * c).sum(0)).sum().backward()
        torch.testing.assert_close(fused[3][1], e.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("scale", [2.0, None])
def test_a_layer_no_other_task_owns_trains_like_the_general_path(layer, scale, monkeypatch):
    """With no other task trained, a layer on the CPU trains through its plain computation and
    autograd's own backward (Eq. 2 is the identity there). Its output, pending mask, ownership and
    every gradient must equal those of the general path (custom Eq. 2 backward)."""
    from avalanche_hat.modules import HATConv2d
    from avalanche_hat.modules.base import HATModule

    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=3)
    if layer == "linear":
        net, x = HATLinear(5, 4, cfg).double(), torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    else:
        net, x = HATConv2d(3, 4, 3, cfg, padding=1).double(), torch.randn(2, 3, 5, 5, dtype=torch.float64,
                                                                             requires_grad=True)
    with torch.no_grad():
        net.mask_embedding.copy_(torch.randn_like(net.mask_embedding))

    def step():
        for t in (x, *net.parameters()):
            t.grad = None
        with fixed_masks():  # scale None: training with fixed (binary) masks, on purpose
            out = net(HATPayload(x, task_id=1, mask_scale=scale))
        (out.data * torch.linspace(-1, 1, out.data.numel(), dtype=torch.float64).view_as(out.data)).sum().backward()
        return out, [t.grad.clone() for t in (x, *net.parameters()) if t.grad is not None]

    fast_out, fast_grads = step()
    assert net._training_ownership(1)[1]  # the fast path was taken
    general = HATModule._training_ownership
    monkeypatch.setattr(HATModule, "_training_ownership", lambda self, t: (general(self, t)[0], False))
    slow_out, slow_grads = step()
    assert torch.equal(fast_out.data, slow_out.data) and torch.equal(fast_out.ownership, slow_out.ownership)
    assert torch.count_nonzero(fast_out.ownership) == 0
    assert len(fast_grads) == len(slow_grads) == (4 if scale is not None else 3)
    for got, want in zip(fast_grads, slow_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    mark_task_trained(net, 0)  # from now on task 0 owns units: the general path
    assert not net._training_ownership(1)[1]


@pytest.mark.parametrize("kind", ["layerwise", "global"])
def test_regulariser_reuses_the_forwards_masks_with_the_same_value_and_gradients(kind):
    """recorded_masks() lets the regulariser use the masks the forward computed: same loss, same
    gradients as computing them again; a layer not in the record (and any scale or task mismatch)
    falls back to computing; nothing is recorded outside the block."""
    from avalanche_hat import recorded_masks
    from avalanche_hat.modules import HATConv1d

    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=3)
    net = TinyMLP(cfg).double()
    net.unused = HATConv1d(2, 2, 1, cfg).double()  # never runs in forward
    with torch.no_grad():
        for layer in (net.fc1, net.fc2, net.unused):
            layer.mask_embedding.copy_(torch.randn_like(layer.mask_embedding))
    mark_task_trained(net, 0)
    x = torch.randn(8, 3, dtype=torch.float64)
    s = 3.0

    def step(reuse):
        net.zero_grad()
        if reuse:
            with recorded_masks() as masks:
                out = net(x, 1, s)
            assert set(masks) == {id(net.fc1), id(net.fc2)}
        else:
            out, masks = net(x, 1, s), None
        loss = out.square().sum() + 0.75 * hat_regularization(net, 1, s, kind=kind, recorded=masks)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

    loss_a, grads_a = step(False)
    loss_b, grads_b = step(True)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with recorded_masks() as masks:
        net(x, 1, s)
    stale = dict(masks)
    net(x, 1, s)  # outside the block
    assert masks == stale
    # A record from another scale is not used.
    with torch.no_grad():
        ref = hat_regularization(net, 1, 5.0, kind=kind)
        assert hat_regularization(net, 1, 5.0, kind=kind, recorded=stale).item() == ref.item()
