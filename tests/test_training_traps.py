"""Two training forwards that changed what HAT learned without a word (issue 14, newcomer QA pass).

1. A training forward of a task that is marked trained (``mark_task_trained(model, 0)``, then
   ``model(HATPayload(x, task_id=0, mask_scale=s))`` in training mode, backward, step) trained task
   0's units, mask embedding and head. It is refused now, before anything changes, unless the loop
   says it is meant (``avalanche_hat.retraining(0)``); eval-mode and no-grad forwards still run.
2. A training forward with ``mask_scale=None`` trained with binary masks, and the embeddings got no
   gradient: the task learned under masks frozen at their initialisation. It is refused now unless
   fixed masks are meant (``avalanche_hat.fixed_masks()``, HAT-CL's ConstantMasker).
"""
import pytest
import torch
from torch import nn

import avalanche_hat
from avalanche_hat import (CosineMaskScale, HATConfig, HATPayload, fixed_masks, forget_task, mark_task_trained,
                           retraining, trained_tasks)
from avalanche_hat.modules import HATLinear, TaskIndexedLinear
from test_any_optimizer import Net, data, outputs, train

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def two_trained_tasks():
    torch.manual_seed(0)
    model = Net(HATConfig(num_tasks=3, mask_init="normal"))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for task in (0, 1):
        train(model, opt, task, *data(task))
        mark_task_trained(model, task)
    return model, opt


# ----------------------------------------------------------------------- 1. a trained task
def test_a_training_forward_of_a_trained_task_is_refused_before_anything_changes():
    model, opt = two_trained_tasks()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"task 0 is marked trained: .*avalanche_hat\.retraining\(0\).*"
                                           r"forget_task\(model, 0\)"):
        train(model, opt, 0, *data(0))
    assert unchanged(model, before)


def test_a_trained_head_alone_is_refused_in_a_training_forward_too():
    model, _ = two_trained_tasks()
    features = HATPayload(torch.randn(4, 16), task_id=0, mask_scale=None)
    model.train()
    with pytest.raises(RuntimeError, match=r"task 0 in TaskIndexedLinear, but task 0 is marked trained"):
        model.head(features)


def test_eval_mode_and_no_grad_forwards_of_a_trained_task_still_run():
    model, _ = two_trained_tasks()
    x = data(0)[0]
    expected = outputs(model, 0, x)
    model.eval()
    assert torch.equal(model(x, 0), expected)  # eval mode, gradients enabled
    model.train()
    with torch.no_grad():
        model(x, 2, 5.0)  # training mode, no gradient, an untrained task: runs
    # a training-mode forward of the task being learned is unaffected
    loss = model(x, 2, 5.0).sum()
    loss.backward()


def test_retraining_a_trained_task_on_purpose_keeps_every_other_task_bit_identical():
    model, opt = two_trained_tasks()
    x0, y0 = data(0)
    x1 = data(1)[0]
    task0, task1 = outputs(model, 0, x0), outputs(model, 1, x1)
    with retraining(0):
        train(model, opt, 0, x0, y0)
    assert trained_tasks(model) == [0, 1]  # still marked: protected again once the block ends
    assert not torch.equal(outputs(model, 0, x0), task0), "task 0 did not train in the block"
    assert torch.equal(outputs(model, 1, x1), task1)
    with pytest.raises(RuntimeError, match="task 0 is marked trained"):
        train(model, opt, 0, x0, y0)


def test_unmarking_then_retraining_keeps_every_other_trained_task_bit_identical():
    model, opt = two_trained_tasks()
    x0, y0 = data(0)
    x1 = data(1)[0]
    task0, task1 = outputs(model, 0, x0), outputs(model, 1, x1)
    mark_task_trained(model, 0, trained=False)
    train(model, opt, 0, x0, y0)
    assert not torch.equal(outputs(model, 0, x0), task0)
    assert torch.equal(outputs(model, 1, x1), task1)
    mark_task_trained(model, 0)
    # forget_task leaves the id ready to learn again, without an opt-in
    forget_task(model, 0)
    train(model, opt, 0, x0, y0)
    assert torch.equal(outputs(model, 1, x1), task1)


def test_retraining_refuses_bad_task_ids():
    with pytest.raises(TypeError, match="retraining must be integer task ids"):
        with retraining(0.5):
            pass
    with pytest.raises(ValueError, match="retraining needs the task ids"):
        with retraining():
            pass


# ----------------------------------------------------------------------- 2. mask_scale=None
def test_a_training_forward_with_mask_scale_none_is_refused_with_the_schedule_to_use():
    torch.manual_seed(0)
    model = Net(HATConfig(num_tasks=2, mask_init="normal"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    x, y = data(0)
    model.train()
    with pytest.raises(ValueError, match=r"task 0 .* with mask_scale=None: .*masks that never move.*"
                                         r"CosineMaskScale.*avalanche_hat\.fixed_masks\(\)"):
        nn.functional.cross_entropy(model(x, 0, None), y).backward()
        opt.step()
    assert unchanged(model, before)
    model.eval()
    model(x, 0, None)  # inference: binary masks, as before
    model.train()
    with torch.no_grad():
        model(x, 0, None)


def test_fixed_masks_opts_in_and_the_masks_stay_where_they_are():
    torch.manual_seed(0)
    model = Net(HATConfig(num_tasks=2, mask_init="normal"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(0)
    embedding = model.fc.mask_embedding.detach().clone()
    weight = model.fc.weight.detach().clone()
    model.train()
    with fixed_masks():
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x, 0, None), y).backward()
            opt.step()
    assert torch.equal(model.fc.mask_embedding, embedding)
    assert not torch.equal(model.fc.weight, weight)
    with pytest.raises(ValueError, match="mask_scale=None"):  # the block ended
        model(x, 0, None)


def test_the_error_names_the_schedule_and_how_to_use_it():
    layer = HATLinear(3, 4, HATConfig(num_tasks=2))
    layer.train()
    with pytest.raises(ValueError) as error:
        layer(HATPayload(torch.randn(2, 3), task_id=1))
    message = str(error.value)
    assert "HATPayload(x, task_id=1, mask_scale=s)" in message
    assert "model.mask_scale = s" in message
    # the schedule the message names exists and gives a scale
    s = avalanche_hat.CosineMaskScale(layer.hat_config.max_mask_scale).at(0, 10)
    layer(HATPayload(torch.randn(2, 3), task_id=1, mask_scale=s))


def test_the_plain_network_and_a_hat_multitask_model_in_training_follow_the_rules():
    """task_id=None (the plain network) needs no scale; HATMultiTaskModel refuses a training forward
    whose mask_scale was never set, and trains once it is."""
    from avalanche_hat import HATMultiTaskModel

    cfg = HATConfig(num_tasks=2)
    layer = HATLinear(3, 4, cfg)
    layer.train()
    layer(HATPayload(torch.randn(2, 3))).data.sum().backward()

    class Backbone(nn.Module):
        num_features = 4

        def __init__(self):
            super().__init__()
            self.fc = HATLinear(3, 4, cfg)

        def forward(self, p):
            return self.fc(p).forward_by(nn.ReLU())

    model = HATMultiTaskModel(Backbone(), num_classes=2, hat_config=cfg)
    model.train()
    with pytest.raises(ValueError, match="model.mask_scale = s"):
        model(torch.randn(2, 3), 0)
    model.mask_scale = CosineMaskScale(cfg.max_mask_scale).at(0, 4)
    model(torch.randn(2, 3), 0).sum().backward()
    assert isinstance(model.head, TaskIndexedLinear)


def test_a_no_grad_training_mode_forward_of_a_trained_task_cannot_touch_its_norm_statistics():
    """No gradient, so no step; but a training-mode BatchNorm overwrites its running statistics in
    the forward, and nothing would restore them before the next optimizer step (an evaluation
    helper that forgets model.eval() changed task 0's eval outputs). Refused before the forward."""
    model, _ = two_trained_tasks()
    x = data(0)[0]
    expected, before = outputs(model, 0, x), snapshot(model)
    model.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"under torch.no_grad\(\).*call model.eval\(\) first"):
        model(x, 0, 5.0)
    assert unchanged(model, before)
    assert torch.equal(outputs(model, 0, x), expected)


def test_statistics_re_estimated_on_purpose_are_kept_by_later_steps():
    model, opt = two_trained_tasks()
    x = data(0)[0]
    before = outputs(model, 0, x)
    model.train()
    with torch.no_grad(), retraining(0):
        model(x * 3.0 + 1.0, 0, 5.0)  # new running statistics for task 0's norms
    refreshed = outputs(model, 0, x)
    assert not torch.equal(refreshed, before)
    train(model, opt, 2, *data(2))  # another task's steps keep what task 0 now holds
    assert torch.equal(outputs(model, 0, x), refreshed)


def test_unmark_then_mark_again_protects_what_the_task_holds_then():
    model, opt = two_trained_tasks()
    x = data(0)[0]
    mark_task_trained(model, 0, trained=False)
    model.train()
    with torch.no_grad():
        model(x * 3.0 + 1.0, 0, 5.0)  # not trained now: its statistics may change
    mark_task_trained(model, 0)
    now = outputs(model, 0, x)
    train(model, opt, 2, *data(2))
    assert torch.equal(outputs(model, 0, x), now)


def test_look_ups_of_a_trained_task_are_not_forwards():
    """Exporting or forgetting a trained task in training mode reads its copies; it is not refused."""
    model, _ = two_trained_tasks()
    model.train()
    head = model.head.to_base_module(0)
    assert torch.equal(head.weight, model.head.copies[0].weight)
    bn = model.bn.to_base_module(0)
    assert torch.equal(bn.running_mean, model.bn.copies[0].running_mean)
    result = forget_task(model, 0, dry_run=True)
    assert result.total > 0
