"""The fused CPU kernels (avalanche_hat.mechanism.fused): the PyTorch path's arithmetic to rounding,
finite at every embedding, a working fallback when they cannot be built, and a switch that turns
them off."""
import copy
import os
import shutil

import pytest
import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload, mark_task_trained
from avalanche_hat.mechanism import fused
from avalanche_hat.modules import HATConv2d, HATLinear, TaskIndexedBatchNorm2d

S_MAX = 400.0
HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.fixture
def kernels():
    if not fused.build():
        pytest.skip("the fused CPU kernels cannot be built here")
    return fused.kernels()


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler")
def test_the_kernels_build_and_are_used_where_a_compiler_is():
    assert fused.build(), "fused_cpu.cpp did not build: see the RuntimeWarning for the compiler's message"
    layer = HATLinear(4, 3, HATConfig(num_tasks=2))
    assert fused.usable(layer.mask_embedding) is not None
    assert fused.usable(layer.mask_embedding.half()) is None  # half precision: the PyTorch path
    assert fused.usable(layer.weight.t()) is None  # not contiguous
    with fused.disabled():
        assert fused.usable(layer.mask_embedding) is None
    assert fused.usable(layer.mask_embedding) is not None


class Net(nn.Module):
    """Linear layers (mask along the last axis) and a conv layer with a task-indexed batch norm (mask
    along the channels, folded into the norm)."""

    def __init__(self, cfg):
        super().__init__()
        self.conv = HATConv2d(2, 4, 3, cfg, padding=1)
        self.bn = TaskIndexedBatchNorm2d(4, cfg)
        self.fc1 = HATLinear(4 * 4 * 4, 16, cfg)
        self.fc2 = HATLinear(16, 5, cfg)

    def forward(self, x, t, s):
        p = self.bn(self.conv(HATPayload(x, task_id=t, mask_scale=s))).forward_by(nn.ReLU())
        p = self.fc1(p.flatten(1)).forward_by(nn.ReLU())
        return self.fc2(p).data


def _steps(net, dtype, tasks=(0, 1), scales=(0.5, 30.0, 400.0)):
    """Outputs and gradients of a few SGD steps per task (task 1 with half of every layer owned by 0)."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    record = []
    for t in tasks:
        for s in scales:
            x = torch.randn(6, 2, 4, 4, generator=gen, dtype=dtype)
            opt.zero_grad()
            out = net(x, t, s)
            (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
            record.append(out.detach().clone())
            record += [p.grad.clone() for p in net.parameters() if p.grad is not None]
            opt.step()
        mark_task_trained(net, t)
    return record


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_a_network_trains_as_with_the_pytorch_operations(kernels, dtype, rtol):
    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=2)
    net = Net(cfg).to(dtype)
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "mask_embedding"):
                m.mask_embedding.normal_(0, 0.1)  # soft masks well inside (0, 1): every gradient matters
    twin = copy.deepcopy(net)
    got = _steps(net, dtype)
    with fused.disabled():
        want = _steps(twin, dtype)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=rtol, atol=rtol)
    # The two ways differ in rounding only: the embedding gradients are not all zero, so this compares something.
    assert any(torch.count_nonzero(g) for g in got if g.shape == net.fc1.mask_embedding.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("saturation", [50.0, None])
def test_soft_mask_and_compensation_are_finite_and_exact_at_every_embedding(kernels, dtype, saturation):
    values = [-1e4, -60.0, -6.0, -0.3, -1e-8, 0.0, 1e-8, 0.3, 6.0, 60.0, 1e4]
    for s in (0.0, 1e-3, 1.0, 40.0, S_MAX):
        emb = torch.tensor([values, [1.0] * len(values)], dtype=dtype, requires_grad=True)
        mask = kernels.soft_mask(emb, 0, s, S_MAX, 0.0 if saturation is None else saturation, saturation is not None)
        grad = torch.linspace(-2, 2, len(values), dtype=dtype)
        mask.backward(grad)
        e = emb.detach()[0].double()
        torch.testing.assert_close(mask.double(), torch.sigmoid(s * e), rtol=1e-6, atol=1e-30)
        # Eq. 3 times the original code's clamp of cosh(s e) at the saturation, in float64.
        clamp = 50.0 if saturation is None else saturation
        factor = S_MAX / (2 * (torch.cosh(e) + 1))
        if saturation is not None:
            factor = factor * torch.exp(torch.clamp(clamp - s * e.abs(), max=0.0))
        assert torch.isfinite(emb.grad).all(), f"non-finite compensated gradient at s={s}"
        torch.testing.assert_close(emb.grad[0].double(), grad.double() * factor, rtol=1e-6, atol=1e-30)
        assert torch.count_nonzero(emb.grad[1]) == 0  # only the task's row is trained


def test_the_mask_product_sums_its_gradient_without_drift_over_many_rows(kernels):
    torch.manual_seed(0)
    data = torch.rand(200_000, 3) + 1.0  # all positive: rounding errors cannot cancel
    mask = torch.rand(3, requires_grad=True)
    grad = torch.rand(200_000, 3)
    out = kernels.mask_last_axis(data, mask)
    assert torch.equal(out, data * mask.detach())
    out.backward(grad)
    exact = (grad.double() * data.double()).sum(0)
    assert ((mask.grad.double() - exact).abs() / exact).max() < 1e-6


def test_a_failed_build_warns_once_and_layers_use_the_pytorch_operations(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: nothing built to load
    monkeypatch.setattr(fused, "_state", {"enabled": True, "kernels": None, "tried": False})
    layer = HATLinear(4, 3, HATConfig(num_tasks=2))
    with pytest.warns(RuntimeWarning, match="could not build its fused CPU kernels.*command not found"):
        out = layer(HATPayload(torch.randn(2, 4), task_id=0, mask_scale=10.0))
    out.data.sum().backward()
    assert layer.mask_embedding.grad[0].abs().sum() > 0
    assert not fused.build() and fused.usable(layer.mask_embedding) is None  # no second try, no second warning


def test_the_environment_switches_the_kernels_off_without_building(monkeypatch):
    from torch.utils import cpp_extension

    def must_not_build(*args, **kwargs):
        raise AssertionError("built although AVALANCHE_HAT_FUSED=0")

    monkeypatch.setattr(cpp_extension, "load", must_not_build)
    monkeypatch.setattr(fused, "_state", {"enabled": None, "kernels": None, "tried": False})
    monkeypatch.setenv("AVALANCHE_HAT_FUSED", "0")
    layer = HATLinear(4, 3, HATConfig(num_tasks=2))
    layer(HATPayload(torch.randn(2, 4), task_id=0, mask_scale=10.0)).data.sum().backward()
    assert fused.kernels() is None and layer.mask_embedding.grad is not None


def test_the_cache_entry_changes_with_the_source_and_the_environment():
    """Two virtual environments (or torch builds, compilers, Pythons, package releases) never share,
    and so never overwrite, one cache entry; an unchanged environment finds its own again."""
    source = fused._SOURCE.read_bytes()
    env = fused.build_environment()
    name = fused.cache_name(source, env)
    assert name == fused.cache_name(source, fused.build_environment())  # stable within an environment
    assert fused.cache_name(source + b"\n// edited", env) != name
    changes = {
        "torch": "9.9.9", "torch_git": "0123abcd", "torch_location": "/other/venv/lib/site-packages/torch",
        "python": "3.99.0", "cflags": ["-O2"], "compiler": {"cxx": "clang++", "path": "/usr/bin/clang++"},
    }
    for key, value in changes.items():
        assert fused.cache_name(source, {**env, key: value}) != name, f"{key} does not change the cache entry"
    assert env["torch_location"] == os.path.realpath(os.path.dirname(torch.__file__))
    assert fused.cache_dir().parent == fused.cache_root()


def test_a_build_says_what_it_does_and_where_it_is_cached(monkeypatch, tmp_path, capfd):
    from torch.utils import cpp_extension

    calls = []

    def fake_build(**kwargs):
        calls.append(kwargs)
        return "compiled module"

    monkeypatch.setattr(cpp_extension, "load", fake_build)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "_state", {"enabled": True, "kernels": None, "tried": False})
    assert fused.kernels() == "compiled module"
    err = capfd.readouterr().err
    folder = tmp_path / "avalanche_hat" / fused.cache_name(fused._SOURCE.read_bytes(), fused.build_environment())
    assert len(calls) == 1 and calls[0]["build_directory"] == str(folder) and calls[0]["name"] == folder.name
    before, _, after = err.partition("ready")
    assert "compiling the fused CPU kernels" in before and "minutes" in before
    assert str(folder) in before and "AVALANCHE_HAT_FUSED=0" in before  # where, and how to skip it
    assert str(folder) in after  # and when it is done
    assert (folder / "built.json").is_file()


def test_a_later_process_loads_the_cached_build_without_building_or_printing(kernels, monkeypatch, capfd):
    from torch.utils import cpp_extension

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt although this environment's build is cached")

    monkeypatch.setattr(cpp_extension, "load", must_not_build)
    monkeypatch.setattr(fused, "_state", {"enabled": True, "kernels": None, "tried": False})  # a new process
    capfd.readouterr()
    module = fused.kernels()
    assert module is not None and hasattr(module, "soft_mask")
    assert capfd.readouterr().err == ""


def test_vmap_takes_the_pytorch_operations(kernels):
    """Task inference runs a network under torch.func.vmap, where C++ autograd functions cannot run."""
    layer = HATLinear(4, 3, HATConfig(num_tasks=2)).eval()
    xs = torch.randn(5, 2, 4)
    batched = torch.func.vmap(lambda x: layer(HATPayload(x, task_id=0)).data)(xs)
    one_by_one = torch.stack([layer(HATPayload(x, task_id=0)).data for x in xs])
    torch.testing.assert_close(batched, one_by_one)


def test_the_mask_product_gives_the_same_bits_on_any_number_of_threads(kernels):
    torch.manual_seed(0)
    data, grad = torch.randn(3000, 40), torch.randn(3000, 40)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x, m = data.clone().requires_grad_(), torch.rand(40, generator=torch.Generator().manual_seed(1)).requires_grad_()
            out = kernels.mask_last_axis(x, m)
            out.backward(grad)
            results.append((out.detach(), x.grad, m.grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("owned_rows", [[], [4], [0, 2, 5], list(range(9))])  # none, few, a third+, all
@pytest.mark.parametrize("inputs", ["unknown", "mixed", "one of many", "all owned"])
@pytest.mark.parametrize("shape", [(3, 7), (40, 7), (2, 5, 7)])  # fewer and more samples than inputs; tokens
@pytest.mark.parametrize("bias", [True, False])
def test_the_one_node_linear_step_gives_the_python_nodes_bits(kernels, owned_rows, inputs, shape, bias):
    """A later task's linear step (Eq. 2 by index, the soft mask, Eq. 3) in C++ must give exactly what
    masks._MaskedNullifiedLinear gives: outputs and every gradient, torch.equal."""
    from avalanche_hat.mechanism.masks import _MaskedNullifiedLinear

    torch.manual_seed(0)
    # "mixed" owns 4 of 7 inputs (Eq. 2 zeroes whole rows against a column mask); "one of many"
    # 1 of 23 (it visits that column alone)
    width = 23 if inputs == "one of many" else 7
    shape = (*shape[:-1], width)
    x = torch.randn(*shape, requires_grad=True)
    w, b = torch.randn(9, width, requires_grad=True), torch.randn(9, requires_grad=True) if bias else None
    emb = (torch.randn(3, 9) * 0.2).requires_grad_()
    out_owned = torch.zeros(9)
    out_owned[owned_rows] = 1.0
    in_owned = {"unknown": None, "mixed": torch.tensor([1.0, 0, 1, 1, 0, 0, 1]), "one of many": torch.eye(23)[11],
                "all owned": torch.ones(7)}[inputs]
    upstream = torch.randn(*shape[:-1], 9)
    leaves = [t for t in (x, w, b, emb) if t is not None]

    def step(fn):
        for t in leaves:
            t.grad = None
        out, mask = fn(x, w, b, emb, out_owned, in_owned, 1, 7.5, S_MAX, 50.0, True)
        (out * mask * upstream).sum().backward()
        return [out.detach(), mask.detach()] + [t.grad.clone() for t in leaves]

    got = step(kernels.masked_nullified_linear)
    want = step(lambda *a: _MaskedNullifiedLinear.apply(*a[:9], True, 50.0))
    for a, b_ in zip(got, want):
        assert torch.equal(a, b_)
    assert torch.count_nonzero(got[-1][1]) > 0 and torch.count_nonzero(got[-1][[0, 2]]) == 0


@pytest.mark.parametrize("task_id", [0, 1])  # the free path and the one-node path
def test_cpu_autocast_trains_through_the_pytorch_operations(kernels, task_id):
    """Under CPU autocast the layer computes in bfloat16, which the kernels do not take: a task's
    step must still train, with Eq. 2 keeping task 0's units frozen."""
    torch.manual_seed(0)
    layer = HATLinear(8, 6, HATConfig(num_tasks=2))
    with torch.no_grad():
        layer.mask_embedding[0] = torch.tensor([1.0, -1, 1, -1, -1, -1])
    mark_task_trained(layer, 0)
    layer.hat_trained[0] = task_id == 1  # task 0 trains with nothing owned; task 1 with units 0 and 2 owned
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(HATPayload(torch.randn(5, 8), task_id=task_id, mask_scale=10.0)).data
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.mask_embedding.grad).all()
    owned = [0, 2] if task_id == 1 else []
    assert torch.count_nonzero(layer.weight.grad[owned]) == 0
    assert torch.count_nonzero(layer.weight.grad[[1, 3]]) > 0
