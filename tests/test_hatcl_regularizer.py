"""This package's usage penalty against HAT-CL 0.1.1's ``get_hat_reg_term`` on the same state.

HAT-CL (``hat.utils.get_hat_reg_term(model, "uniform", task_id=t, mask_scale=s)``) averages over
its maskers, per layer ``max(sum_i a_i f_i - N_l / T, 0) / sum_i f_i`` with ``f_i = 1 - a_i^{<t}``
(0 for a layer with no free unit); this package's ``kind="layerwise"`` sums over layers
``max(sum_i a_i f_i / sum_i f_i - q, 0)``. The reference below is written from that definition,
unit by unit, independently of the package's code; docs/migration.md states the relation.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload, hat_regularization, mark_task_trained
from avalanche_hat.mechanism import hatcl_usage_penalty, layerwise_usage_penalty
from avalanche_hat.modules import HATConv2d, HATLinear


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class Net(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.conv = HATConv2d(3, 6, 3, cfg, padding=1)
        self.fc1 = HATLinear(6 * 4 * 4, 20, cfg)
        self.fc2 = HATLinear(20, 9, cfg)

    def forward(self, x, task_id, mask_scale=None):
        p = HATPayload(x, task_id=task_id, mask_scale=mask_scale)
        p = self.conv(p).forward_by(nn.AdaptiveAvgPool2d(4)).flatten(1)
        return self.fc2(self.fc1(p)).data


def hatcl_reference(model, task_id, mask_scale, num_tasks):
    """HAT-CL's uniform term from its definition: per layer, unit by unit."""
    terms = []
    for layer in (model.conv, model.fc1, model.fc2):
        e = layer.mask_embedding
        trained = [t for t in range(num_tasks) if bool(layer.hat_trained[t]) and t != task_id]
        used, free = 0.0, 0
        for i in range(e.shape[1]):
            locked = any(float(e[t, i]) > 0 for t in trained)
            if not locked:
                used = used + torch.sigmoid(e[task_id, i] * mask_scale)
                free += 1
        if free == 0:
            terms.append(torch.tensor(0.0))
            continue
        over = used - e.shape[1] / num_tasks  # HAT-CL's quota: N_l / T units
        terms.append(over / free if float(over) > 0 else 0.0 * over)
    return sum(terms) / len(terms)


def layer_pairs(model, task_id, mask_scale):
    return [(m.mask(task_id, mask_scale), m.ownership(task_id)) for m in (model.conv, model.fc1, model.fc2)]


def _model(num_tasks=4, trained=(0, 1), **config):
    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=num_tasks, mask_init="normal", **config)
    model = Net(cfg)
    with torch.no_grad():  # trained tasks own about a fifth of the units each; the others use more
        for m in (model.conv, model.fc1, model.fc2):
            m.mask_embedding.normal_(1.0, 1.0)
            m.mask_embedding[list(trained)] -= 1.8
    for t in trained:
        mark_task_trained(model, t)
    return model


@pytest.mark.parametrize("task_id,trained", [(0, ()), (2, (0, 1)), (3, (0, 1, 2))])
@pytest.mark.parametrize("scale", [0.5, 4.0, 50.0])
def test_hatcl_kind_is_hatcls_term_and_the_formula_relates_it_to_layerwise(task_id, trained, scale):
    T = 4
    model = _model(T, trained)
    ref = hatcl_reference(model, task_id, scale, T)
    ours = hat_regularization(model, task_id, scale, kind="hatcl")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    assert float(ref) > 0, "the state must put some layer over HAT-CL's quota, or the test shows nothing"
    # The relation: HAT-CL = (1 / L) sum_l layerwise_l with the layer's own quota N_l / (T F_l).
    pairs = layer_pairs(model, task_id, scale)
    per_layer = []
    for mask, owned in pairs:
        free = float((1 - owned).sum())
        per_layer.append(layerwise_usage_penalty([(mask, owned)], mask.numel() / (T * free)) if free
                         else torch.tensor(0.0))
    torch.testing.assert_close(sum(per_layer) / len(pairs), ref, rtol=1e-6, atol=1e-7)
    assert float(hatcl_usage_penalty(pairs, T)) == pytest.approx(float(ref), rel=1e-6)
    if not trained:  # nothing owned: F_l = N_l, the quotas are 1 / T, HAT-CL = layerwise / L
        layerwise = hat_regularization(model, task_id, scale)  # default quota 1 / num_tasks
        torch.testing.assert_close(layerwise / 3, ref, rtol=1e-6, atol=1e-7)
    else:  # the relation is not a constant factor once units are owned
        assert float(hat_regularization(model, task_id, scale)) / 3 != pytest.approx(float(ref), rel=1e-3)


def test_hatcl_kind_has_hatcls_gradient():
    """Without Eq. 3 (both packages rescale the embedding gradient, each with its own factor)."""
    model = _model(4, (0, 1), gradient_compensation=False)
    for p in model.parameters():
        p.grad = None
    hat_regularization(model, 2, 2.0, kind="hatcl").backward()
    ours = [m.mask_embedding.grad.clone() for m in (model.conv, model.fc1, model.fc2)]
    for p in model.parameters():
        p.grad = None
    hatcl_reference(model, 2, 2.0, 4).backward()
    for a, m in zip(ours, (model.conv, model.fc1, model.fc2)):
        torch.testing.assert_close(a, m.mask_embedding.grad, rtol=1e-5, atol=1e-7)
    assert any(float(a.abs().sum()) > 0 for a in ours)


def test_a_layer_with_no_free_unit_counts_in_hatcls_mean():
    model = _model(2, (0,))
    with torch.no_grad():
        model.fc2.mask_embedding[0].fill_(1.0)  # task 0 owns every unit of fc2
    ref = hatcl_reference(model, 1, 3.0, 2)
    torch.testing.assert_close(hat_regularization(model, 1, 3.0, kind="hatcl"), ref, rtol=1e-6, atol=1e-7)


def test_the_plugin_adds_hatcls_term_with_regularization_hatcl():
    from avalanche.core import SupervisedPlugin
    from cifar_fixtures import tensor_benchmark
    from test_training import make_strategy

    class Check(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.gaps = []

        def after_backward(self, strategy, **kwargs):
            model = strategy.model
            ce = strategy._criterion(strategy.mb_output, strategy.mb_y)
            reg = hat_regularization(model, int(strategy.mb_task_id[0]), model.mask_scale, kind="hatcl")
            self.gaps.append(abs(float(strategy.loss - ce - 0.5 * reg)))

    check = Check()
    strategy = make_strategy(plugins=[check], epochs=1, regularization="hatcl", reg_coef=0.5)
    strategy.train(tensor_benchmark(3).train_stream[0])
    assert check.gaps and max(check.gaps) < 1e-5
    with pytest.raises(ValueError, match="unknown regularisation kind"):
        hat_regularization(strategy.model, 0, 1.0, kind="mean")
