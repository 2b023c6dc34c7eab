"""What a HAT-CL user relies on when porting: ``forward_by`` with HAT modules and networks runs the
payload's task (never the plain network), HAT-CL's exponential schedule, fixed masks, and the
relation between this package's regulariser and HAT-CL's."""
import math

import pytest
import timm
import torch
from torch import nn

import avalanche_hat.timm_models  # noqa: F401  (registers the hat_* networks)
from avalanche_hat import HATConfig, HATPayload, mark_task_trained
from avalanche_hat.modules import HATLinear, TaskIndexedBatchNorm1d


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _trained_mlp(num_tasks=2):
    """A hat_mlp whose task 0 and task 1 compute different things (and differ from the plain net)."""
    torch.manual_seed(0)
    net = timm.create_model("hat_mlp", hat_config=HATConfig(num_tasks=num_tasks, mask_init="normal"),
                            num_classes=3, hidden_sizes=(16,), img_size=4)
    with torch.no_grad():
        for layer in net.hidden:
            layer.mask_embedding.normal_()
    return net.eval()


# ------------------------------------------------------------------------------------ forward_by
@pytest.mark.parametrize("task_id,scale", [(1, None), (0, 5.0), (None, None)])
def test_forward_by_a_hat_network_runs_the_payloads_task(task_id, scale):
    net = _trained_mlp()
    x = torch.randn(5, 1, 4, 4)
    out = HATPayload(x, task_id=task_id, mask_scale=scale).forward_by(net)
    assert isinstance(out, HATPayload) and out.task_id == task_id and out.mask_scale == scale
    assert torch.equal(out.data, net(x, task_id=task_id, mask_scale=scale))
    if task_id is not None:
        assert not torch.equal(out.data, net(x)), "the plain network computes the same: the test shows nothing"


def test_forward_by_a_hat_layer_or_task_indexed_layer_takes_the_payload():
    cfg = HATConfig(num_tasks=2, mask_init="normal")
    torch.manual_seed(0)
    fc, bn = HATLinear(6, 4, cfg).eval(), TaskIndexedBatchNorm1d(4, cfg).eval()
    with torch.no_grad():
        bn.copies[1].running_mean.uniform_()
        bn.copies[1].weight.uniform_()
    x = torch.randn(3, 6)
    p = HATPayload(x, task_id=1)
    direct = bn(fc(p))
    via = p.forward_by(fc).forward_by(bn)
    assert via.task_id == 1 and torch.equal(via.data, direct.data)
    assert not torch.equal(via.data, bn(fc(HATPayload(x))).data)
    # an nn.Sequential with HAT layers: each module in turn, for the payload's task
    seq = nn.Sequential(fc, nn.ReLU(), bn)
    assert torch.equal(p.forward_by(seq).data, bn(fc(p).forward_by(nn.ReLU())).data)


def test_forward_by_a_module_following_the_keyword_convention_gets_the_task():
    net = _trained_mlp()

    class Wrapper(nn.Module):  # a user's network: forward(x, task_id, mask_scale) with a tensor
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, task_id=None, mask_scale=None):
            return self.net(x, task_id=task_id, mask_scale=mask_scale) * 2

    x = torch.randn(5, 1, 4, 4)
    out = HATPayload(x, task_id=1).forward_by(Wrapper())
    assert out.task_id == 1 and torch.equal(out.data, net(x, task_id=1) * 2)


def test_forward_by_a_module_with_hat_layers_that_cannot_be_told_the_task_is_refused():
    net = _trained_mlp()

    class TensorOnly(nn.Module):  # forward(x) on a tensor: it would run the plain network
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    with pytest.raises(TypeError, match=r"cannot be run for this payload's task.*plain network"):
        HATPayload(torch.randn(2, 1, 4, 4), task_id=1).forward_by(TensorOnly())


def test_forward_by_plain_modules_is_unchanged():
    x = torch.randn(3, 4)
    p = HATPayload(x, task_id=0)
    assert torch.equal(p.forward_by(nn.Softmax(dim=1)).data, x.softmax(1))
    assert torch.equal(p.forward_by(torch.nn.functional.relu).data, x.relu())


# -------------------------------------------------------------------------------------- schedules
def test_exponential_schedule_is_hatcl_formula():
    from avalanche_hat import ExponentialMaskScale
    from avalanche_hat.mechanism import make_schedule

    s_max, r = 100.0, 0.8
    sched = ExponentialMaskScale(s_max)
    # HAT-CL: base = s_max ** (1 / r); s = base ** (p - 1 + r)
    for p in (0.0, 0.1, 0.2, 0.5, 0.9, 1.0):
        assert sched(p) == pytest.approx((s_max ** (1 / r)) ** (p - 1 + r), rel=1e-12)
    assert sched(1.0) == pytest.approx(s_max) and sched(1 - r) == pytest.approx(1.0)
    assert sched(0.0) == pytest.approx(s_max ** (-(1 - r) / r))
    scales = [sched.at(b, 10) for b in range(10)]
    assert scales == sorted(scales) and sum(s > 1 for s in scales) == 8  # above 1 for r of the unit
    assert isinstance(make_schedule("exponential", 50.0), ExponentialMaskScale)
    assert make_schedule("exponential", 50.0).max_scale == 50.0
    with pytest.raises(ValueError, match="ratio_above_one"):
        ExponentialMaskScale(10.0, ratio_above_one=0.0)


def test_hat_plugin_runs_the_exponential_schedule_by_name():
    from avalanche_hat import ExponentialMaskScale
    from test_training import Recorder, make_strategy, tensor_benchmark

    recorder = Recorder()
    strategy = make_strategy(plugins=[recorder], epochs=1, schedule="exponential", max_mask_scale=100.0)
    strategy.train(tensor_benchmark(3).train_stream[0])
    assert recorder.train_scales == pytest.approx([ExponentialMaskScale(100.0).at(b, 4) for b in range(4)])
