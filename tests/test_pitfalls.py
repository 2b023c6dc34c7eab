"""One test for each shortcoming of the published HAT-CL package (HAT_NOTES.md), and bad input."""
import copy
import io
import pathlib
import pickle

import pytest
import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload, hat_param_groups, mark_task_trained, trained_tasks
from avalanche_hat.modules import (
    HATConv1d, HATConv2d, HATConv3d, HATLinear, TaskIndexedBatchNorm2d, TaskIndexedLayerNorm,
    TaskIndexedLinear, from_base_module, load_plain_state_dict,
)

from nets import SmallConvNet, make_tasks, outputs, train_task

CFG = HATConfig(num_tasks=3)


def payload_with_mask(shape=(2, 4, 5), mask_dim=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(*shape, generator=g)
    mask = torch.rand(shape[mask_dim], generator=g)
    return HATPayload(data, task_id=0, mask_scale=1.0, mask=mask, mask_dim=mask_dim), data, mask


def test_residual_add_applies_each_soft_mask_once():
    p, data, mask = payload_with_mask()
    q, data2, mask2 = payload_with_mask(seed=1)
    expected = data * mask.view(1, -1, 1) + data2 * mask2.view(1, -1, 1)
    assert torch.equal((p + q).data, expected)
    assert torch.equal((p + p).data, 2 * data * mask.view(1, -1, 1))  # m, never m^2


@pytest.mark.parametrize(
    "op",
    [
        lambda p: p.permute(0, 2, 1),
        lambda p: p.permute(2, 0, 1),
        lambda p: p.transpose(1, 2),
        lambda p: p.transpose(0, 1),
        lambda p: p.flatten(1),
        lambda p: p.flatten(0, 1),
        lambda p: p.reshape(2, 20),
        lambda p: p.reshape(2, 4, 5, 1),
        lambda p: p.view(-1),
        lambda p: p * 3.0,
    ],
)
def test_shape_operations_keep_the_mask_on_the_right_axis(op):
    p, _, _ = payload_with_mask()
    expected = op(HATPayload(p.data))  # the same op on the already-masked tensor
    # Pure data movement is exact; a scalar multiple may round differently ((x*3)*m vs (x*m)*3).
    torch.testing.assert_close(op(p).data, expected.data, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch", [1, 2])
def test_unit_ownership_survives_reshapes_at_any_batch_size(batch):
    owned = torch.tensor([1.0, 0.0, 1.0, 0.0])
    p = HATPayload(torch.randn(batch, 4, 2, 2), task_id=0, mask=torch.ones(4), mask_dim=1, ownership=owned)
    assert p.flatten(2).mask_dim == 1 and torch.equal(p.flatten(2).ownership, owned)
    flat = p.flatten(1)
    assert flat.mask_dim == 1 and torch.equal(flat.ownership, owned.repeat_interleave(4))


def test_masks_follow_load_state_dict_and_dtype_changes():
    a, b = HATLinear(4, 6, CFG).eval(), HATLinear(4, 6, CFG).eval()  # binary masks: inference
    with torch.no_grad():
        a.mask_embedding[0] = torch.tensor([1.0, -1, 1, -1, 1, -1])
    x = torch.randn(3, 4)
    b(HATPayload(x, task_id=0))  # a forward before loading: nothing may be cached from it
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(HATPayload(x, task_id=0)).data, a(HATPayload(x, task_id=0)).data)
    assert (b(HATPayload(x, task_id=0)).data[:, 1::2] == 0).all()
    d = copy.deepcopy(a).to(torch.float64)
    out = d(HATPayload(x.double(), task_id=0)).data
    assert out.dtype == torch.float64 and (out[:, 1::2] == 0).all()


@pytest.mark.parametrize("clone", ["deepcopy", "pickle", "state_dict"])
def test_protection_survives_deepcopy_pickle_and_state_dict(clone):
    torch.manual_seed(0)
    tasks = make_tasks(2)
    model = SmallConvNet(HATConfig(num_tasks=2))
    adam = lambda m: lambda _params: torch.optim.Adam(hat_param_groups(m, embedding_lr=0.5), lr=0.01)  # noqa: E731
    train_task(model, 0, *tasks[0], adam(model), batch=8, reg=0.05)
    before = outputs(model, 0, tasks[0][0])
    if clone == "deepcopy":
        model = copy.deepcopy(model)
    elif clone == "pickle":
        model = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        fresh = SmallConvNet(HATConfig(num_tasks=2))
        fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
        model = fresh
    assert trained_tasks(model) == [0]
    shared = model.conv2.weight.detach().clone()
    train_task(model, 1, *tasks[1], adam(model), batch=8, reg=0.05)
    assert torch.equal(outputs(model, 0, tasks[0][0]), before)
    assert not torch.equal(model.conv2.weight, shared)  # task 1 did train shared weights


def test_task_none_trains_the_plain_network_with_nothing_frozen():
    torch.manual_seed(0)
    layer = HATLinear(4, 3, CFG)
    plain = layer.to_base_module()
    x = torch.randn(8, 4)
    layer(HATPayload(x, task_id=0, mask_scale=10.0)).data.sum().backward()  # a task-0 step, not marked
    torch.optim.SGD(layer.parameters(), lr=0.0).step()
    layer.zero_grad()
    with pytest.raises(RuntimeError, match=r"mark_task_trained\(model, 0\)"):  # it would lose task 0
        layer(HATPayload(x))
    mark_task_trained(layer, 0, trained=False)  # discard task 0 on purpose: nothing is protected
    layer(HATPayload(x)).data.pow(2).sum().backward()
    plain(x).pow(2).sum().backward()
    assert torch.equal(layer.weight.grad, plain.weight.grad) and torch.equal(layer.bias.grad, plain.bias.grad)


def test_training_with_no_task_id_after_a_task_is_learned_is_refused():
    layer = HATLinear(4, 3, CFG)
    mark_task_trained(layer, 0)
    before = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="task_id=None would overwrite"):
        layer(HATPayload(torch.randn(2, 4)))
    assert torch.equal(layer.weight, before)
    layer.eval()
    layer(HATPayload(torch.randn(2, 4)))  # inference of the plain network is fine


def test_a_training_forward_does_not_mark_a_task_trained():
    layer = HATLinear(4, 3, CFG)
    layer(HATPayload(torch.randn(2, 4), task_id=1, mask_scale=5.0))
    assert trained_tasks(layer) == []
    assert layer.ownership(0).sum() == 0


@pytest.mark.parametrize("groups,bias", [(1, False), (2, True), (8, True), (8, False)])
def test_grouped_depthwise_and_biasless_convolutions(groups, bias):
    plain = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=bias)
    hat = from_base_module(plain, CFG)
    assert isinstance(hat, HATConv2d) and (hat.bias is None) == (not bias)
    x = torch.randn(2, 8, 6, 6)
    hat.eval()
    for t in (None, 0, 2):
        torch.testing.assert_close(hat(HATPayload(x, task_id=t)).data, plain(x), rtol=0, atol=0)
    back = hat.to_base_module()
    assert torch.equal(back(x), plain(x))
    # Eq. 2 for a grouped weight: output 0 owned, inputs of its group owned -> frozen.
    hat.train()
    with torch.no_grad():
        hat.mask_embedding[0] = -1.0
        hat.mask_embedding[0, 0] = 1.0
    mark_task_trained(hat, 0)
    owned_in = torch.zeros(8)
    owned_in[0] = 1.0
    p = HATPayload(x, task_id=1, mask_scale=1.0, mask_dim=1, ownership=owned_in)
    hat(p).data.sum().backward()
    assert hat.weight.grad[0, 0].abs().sum() == 0  # owned out 0, owned in 0
    if groups == 1:
        assert hat.weight.grad[0, 1].abs().sum() > 0  # owned out 0, unowned in 1


@pytest.mark.parametrize("cls,shape", [(HATConv1d, (2, 3, 7)), (HATConv3d, (2, 3, 4, 4, 4))])
def test_conv1d_and_conv3d(cls, shape):
    conv = cls(3, 5, 3, CFG, padding=1)
    out = conv(HATPayload(torch.randn(*shape), task_id=0, mask_scale=4.0))
    assert out.data.shape[:2] == (2, 5)


def test_plain_weights_reach_every_copy_including_task_none():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        plain[1].running_mean.uniform_(); plain[1].weight.uniform_(); plain[3].weight.uniform_()
    hat = nn.ModuleDict({"0": HATConv2d(3, 4, 3, CFG), "1": TaskIndexedBatchNorm2d(4, CFG), "3": TaskIndexedLinear(4, 2, CFG)})
    load_plain_state_dict(hat, plain.state_dict())
    for i in range(CFG.num_tasks + 1):  # index num_tasks is the task_id=None copy
        assert torch.equal(hat["1"].copies[i].running_mean, plain[1].running_mean)
        assert torch.equal(hat["3"].copies[i].weight, plain[3].weight)
    with pytest.raises(RuntimeError, match="do not match"):
        load_plain_state_dict(hat, {"0.weight": plain[0].weight, "9.weight": torch.zeros(1)})


def test_batch_norm_folds_the_mask_into_its_affine_parameters_exactly_as_applied_after():
    conv = HATConv2d(3, 4, 3, CFG)
    bn = TaskIndexedBatchNorm2d(4, CFG)
    reference = copy.deepcopy(bn.copies[1])
    x = torch.randn(5, 3, 6, 6)
    p = conv(HATPayload(x, task_id=1, mask_scale=2.0))
    out = bn(p)
    expected = reference(p.unmasked_data) * p.pending_mask.view(1, -1, 1, 1)
    torch.testing.assert_close(out.data, expected)
    torch.testing.assert_close(bn.copies[1].running_mean, reference.running_mean)
    assert bn.copies[1].num_batches_tracked == reference.num_batches_tracked == 1
    assert torch.equal(bn.copies[0].running_mean, torch.zeros(4))  # other copies untouched


def test_layer_norm_normalises_the_masked_output_and_masks_it_again():
    lin = HATLinear(6, 8, CFG)
    ln = TaskIndexedLayerNorm(8, CFG)
    p = lin(HATPayload(torch.randn(2, 3, 6), task_id=0, mask_scale=3.0))
    expected = ln.copies[0](p.data) * p.pending_mask  # statistics over the task's units only (tests/test_norms.py)
    torch.testing.assert_close(ln(p).data, expected)


# ------------------------------------------------------------------------------------ bad input
def test_task_id_out_of_range_is_a_clear_error():
    layer = HATLinear(4, 3, CFG)
    with pytest.raises(ValueError, match=r"task_id 3 is out of range .*use 0..2"):
        layer(HATPayload(torch.randn(2, 4), task_id=3, mask_scale=1.0))
    with pytest.raises(ValueError, match="out of range"):
        mark_task_trained(layer, -1)
    with pytest.raises(TypeError, match="Python int"):
        layer(HATPayload(torch.randn(2, 4), task_id=torch.tensor(1)))


def test_payload_without_task_id_in_training_is_a_clear_error():
    with pytest.raises(ValueError, match="a mask_scale needs a task_id"):
        HATPayload(torch.randn(2, 4), mask_scale=10.0)


def test_mismatched_mask_dimension_is_a_clear_error():
    with pytest.raises(ValueError, match="mismatched mask dimension"):
        HATPayload(torch.randn(2, 4), task_id=0, mask=torch.ones(3), mask_dim=1)


def test_wrong_input_shape_and_bare_tensors_are_clear_errors():
    conv = HATConv2d(3, 4, 3, CFG)
    with pytest.raises(ValueError, match=r"expects a batched input of 4 dims"):
        conv(HATPayload(torch.randn(3, 8, 8), task_id=0))
    with pytest.raises(ValueError, match="expects 3 input units"):
        conv(HATPayload(torch.randn(1, 5, 8, 8), task_id=0))
    with pytest.raises(TypeError, match="takes a HATPayload"):
        conv(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="needs a HATConfig"):
        HATLinear(3, 4, None)


def test_forgetting_to_mark_a_task_is_refused_not_warned():
    layer = HATLinear(4, 3, CFG)
    layer(HATPayload(torch.randn(2, 4), task_id=0, mask_scale=1.0)).data.sum().backward()
    torch.optim.Adam(layer.parameters()).step()
    layer(HATPayload(torch.randn(2, 4), task_id=0, mask_scale=1.0))  # task 0 again: fine
    with pytest.raises(RuntimeError, match=r"mark_task_trained\(model, 0\)"):
        layer(HATPayload(torch.randn(2, 4), task_id=1, mask_scale=1.0))


def test_ci_test_target_can_fail():
    ci = (pathlib.Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci and "pytest" in ci and "|| true" not in ci
