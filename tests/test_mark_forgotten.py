"""Protection that does not depend on a call the user can forget (issue 14, item 4), and per-forward
locking (issue 18: HAT-CL's ``locked_task_ids``).

A HAT-CL-style loop that trains task 0 and then task 1 without ever calling ``mark_task_trained``
used to lose task 0 after a warning (and, after a ``state_dict`` reload, without one). Now the
first training forward of task 1 raises before anything is touched, and the record of which tasks
trained lives in the ``state_dict``; joint training of unmarked tasks is an explicit opt-in, and a
lock protects a task for some forwards without marking it.
"""
import copy
import pickle

import pytest
import torch
from torch import nn

import avalanche_hat
from avalanche_hat import HATConfig, HATPayload, forget_task, joint_training, locked_tasks, mark_task_trained
from test_any_optimizer import Net, data, outputs, train

pytestmark = pytest.mark.usefixtures("one_thread")


def model_after_task_0(optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01)):
    torch.manual_seed(0)
    model = Net(HATConfig(num_tasks=3, mask_init="normal"))
    opt = optimizer(model.parameters())
    train(model, opt, 0, *data(0))
    return model, opt


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)


def test_training_task_1_after_an_unmarked_task_0_is_refused_before_anything_changes():
    model, opt = model_after_task_0()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"task\(s\) 0 had training steps .*mark_task_trained\(model, 0\)"):
        train(model, opt, 1, *data(1))
    assert unchanged(model, before)


@pytest.mark.parametrize("how", ["state_dict", "pickle", "deepcopy"])
def test_the_record_of_trained_tasks_survives_reload_pickle_and_deepcopy(how):
    model, _ = model_after_task_0()
    if how == "state_dict":
        fresh = Net(model.fc.hat_config)
        fresh.load_state_dict(model.state_dict())
    elif how == "pickle":
        fresh = pickle.loads(pickle.dumps(model))
    else:
        fresh = copy.deepcopy(model)
    opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    with pytest.raises(RuntimeError, match=r"mark_task_trained\(model, 0\)"):
        train(fresh, opt, 1, *data(1))


def test_a_checkpoint_without_the_record_still_loads_and_its_trained_tasks_count_as_trained():
    model, opt = model_after_task_0()
    mark_task_trained(model, 0)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("hat_stepped")}
    fresh = Net(model.fc.hat_config)
    fresh.load_state_dict(old)  # strict
    assert fresh.fc.hat_stepped.tolist() == [True, False, False]
    before = outputs(fresh, 0, data(0)[0])
    train(fresh, torch.optim.Adam(fresh.parameters(), lr=0.01), 1, *data(1))
    assert torch.equal(outputs(fresh, 0, data(0)[0]), before)
    pickled = pickle.loads(pickle.dumps(model))
    del pickled.fc._buffers["hat_stepped"]  # an object pickled before the record existed
    restored = pickle.loads(pickle.dumps(pickled))
    assert restored.fc.hat_stepped.tolist() == [True, False, False]


def test_marking_discarding_or_forgetting_the_earlier_task_lets_the_next_one_train():
    for resolve in ("mark", "discard", "forget"):
        model, opt = model_after_task_0()
        if resolve == "mark":
            mark_task_trained(model, 0)
        elif resolve == "discard":
            mark_task_trained(model, 0, trained=False)
        else:
            mark_task_trained(model, 0)
            forget_task(model, 0)
        train(model, opt, 1, *data(1))  # no error


def test_plain_network_training_after_an_unmarked_task_is_refused_too():
    model, _ = model_after_task_0()
    model.train()
    with pytest.raises(RuntimeError, match=r"mark_task_trained\(model, 0\)"):
        model.fc(HATPayload(torch.randn(2, 32)))


def test_joint_training_of_unmarked_tasks_is_an_explicit_opt_in():
    model, opt = model_after_task_0()
    with joint_training(0, 1):
        for _ in range(2):
            train(model, opt, 1, *data(1), steps=2)
            train(model, opt, 0, *data(0), steps=2)
        with pytest.raises(RuntimeError, match=r"task\(s\) 0, 1 had training steps"):
            train(model, opt, 2, *data(2), steps=1)  # task 2 is not part of the block
    with pytest.raises(RuntimeError, match="mark_task_trained"):
        train(model, opt, 1, *data(1), steps=1)  # outside the block, again refused
    with pytest.raises(ValueError, match="at least two"):
        with joint_training(1):
            pass


# --------------------------------------------------------------------------------------- locking
class Locked(Net):
    def forward(self, x, task_id, scale=None, locked=None):
        p = self.bn(self.conv(HATPayload(x, task_id=task_id, mask_scale=scale, locked_task_ids=locked)))
        p = p.forward_by(nn.ReLU()).forward_by(nn.AdaptiveAvgPool2d(2)).flatten(1)
        return self.head(self.bn1d(self.fc(p)).forward_by(nn.ReLU()))


@pytest.mark.parametrize("how", ["payload", "context"])
def test_a_locked_task_stays_bit_identical_while_another_trains_with_adam(how):
    torch.manual_seed(0)
    model = Locked(HATConfig(num_tasks=3, mask_init="normal"))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)  # never reset: its moments of task 0 stay
    (x0, y0), (x1, y1) = data(0), data(1)
    train(model, opt, 0, x0, y0)
    before = outputs(model, 0, x0)
    weight = model.fc.weight.detach().clone()
    model.train()
    for i in range(10):
        opt.zero_grad(set_to_none=False)
        if how == "payload":
            out = model(x1, 1, 5.0 + i, locked=[0])
        else:
            with locked_tasks(0):
                out = model(x1, 1, 5.0 + i)
        nn.functional.cross_entropy(out, y1).backward()
        opt.step()
    assert not torch.equal(model.fc.weight, weight)
    assert torch.equal(outputs(model, 0, x0), before)
    assert avalanche_hat.trained_tasks(model) == []  # locking does not mark


def test_bad_locked_task_ids_are_refused_clearly():
    torch.manual_seed(0)
    model = Locked(HATConfig(num_tasks=3))
    model.train()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="cannot be locked in its own forward"):
        HATPayload(x, task_id=1, locked_task_ids=[1])
    with pytest.raises(TypeError, match="integer task ids"):
        HATPayload(x, task_id=1, locked_task_ids=[0.5])
    with pytest.raises(ValueError, match=">= 0"):
        HATPayload(x, task_id=1, locked_task_ids=[-1])
    with pytest.raises(ValueError, match="needs a task_id"):
        HATPayload(x, locked_task_ids=[0])
    with pytest.raises(ValueError, match="task_id"):
        model(x, 1, 1.0, locked=[7])  # outside the 3 tasks the model was built for
    with pytest.raises(ValueError, match="both trained and locked"):
        with locked_tasks(1):
            model(x, 1, 1.0)
    with pytest.raises(TypeError, match="integer task ids"):
        with locked_tasks("0"):
            pass
