"""HAT's guarantee next to other Avalanche plugins and parts HAT cannot protect: each combination
ends with task 0's outputs bit-identical after task 1 trained, or with a clear error before anything
learned is touched.

- replay, A-GEM, GEM and LwF are refused (by name before training, and, for plugins the package
  does not know, at the minibatch or the forward that would train another task);
- Naive, EWC and SI keep working;
- plain trainable parameters and norms are refused by name, or frozen after the first task;
- non-integer task labels are refused; the divergence error says what it checked.
"""
import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import avalanche_forward
from avalanche.training import LwF, Naive
from avalanche.training.plugins import (
    AGEMPlugin, EWCPlugin, GEMPlugin, LwFPlugin, ReplayPlugin, SynapticIntelligencePlugin,
)
from torch import nn

from avalanche_hat import HAT, HATConfig, HATMultiTaskModel, HATPayload, HATPlugin, trained_tasks
from avalanche_hat.modules import HATConv2d, HATLinear

from cifar_fixtures import TinyHATNet, exact_eval_metrics, tensor_benchmark

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]


def hat_model(num_tasks=2):
    torch.manual_seed(0)
    return HATMultiTaskModel(TinyHATNet(HATConfig(num_tasks=num_tasks, mask_init="normal")), num_classes=2)


def naive(model, plugins, epochs=2, **kwargs):
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), plugins=plugins,
                 train_mb_size=8, train_epochs=epochs, eval_mb_size=64, evaluator=exact_eval_metrics(), **kwargs)


def eval_inputs(benchmark, t):
    data = benchmark.test_stream[t].dataset.eval()
    return torch.stack([data[i][0] for i in range(len(data))])


@torch.no_grad()
def logits(model, x, task):
    model.eval()
    return model(x, torch.full((len(x),), task))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------- plugins that replay or distil
@pytest.mark.parametrize("make_plugin", [
    lambda: ReplayPlugin(mem_size=16),
    lambda: AGEMPlugin(patterns_per_experience=8, sample_size=8),
    lambda: GEMPlugin(patterns_per_experience=8, memory_strength=0.5),
    lambda: LwFPlugin(alpha=1.0, temperature=2.0),
], ids=["replay", "agem", "gem", "lwf"])
def test_replay_gradient_memory_and_distillation_plugins_are_refused_before_anything_trains(make_plugin):
    """With the HATPlugin, these trained task 0's head, units and BatchNorm statistics while task 1
    trained (drift 0.01 to 0.11): they are refused at the first experience, nothing touched."""
    model = hat_model()
    before = state(model)
    strategy = naive(model, [make_plugin(), HATPlugin()])
    with pytest.raises(ValueError, match="HAT needs no replay"):
        strategy.train(tensor_benchmark(2).train_stream[0])
    assert same_state(state(model), before)


def test_the_lwf_strategy_with_the_hat_plugin_is_refused():
    model = hat_model()
    strategy = LwF(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), criterion=nn.CrossEntropyLoss(),
                   alpha=1.0, temperature=2.0, plugins=[HATPlugin()], train_mb_size=8, evaluator=exact_eval_metrics())
    with pytest.raises(ValueError, match="LwFPlugin forwards every learned task's head .* HAT needs no replay"):
        strategy.train(tensor_benchmark(2).train_stream[0])


def test_the_hat_strategy_refuses_a_replay_plugin():
    torch.manual_seed(0)
    net = TinyHATNet(HATConfig(num_tasks=2))
    strategy = HAT(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), num_classes=2,
                   plugins=[ReplayPlugin(mem_size=16)], train_mb_size=8, evaluator=exact_eval_metrics())
    with pytest.raises(ValueError, match="ReplayPlugin trains on stored samples .* HAT needs no replay"):
        strategy.train(tensor_benchmark(2).train_stream[0])


class MixInTask0(SupervisedPlugin):
    """Replay the package does not know by name: task 0's samples appended to task 1's minibatches."""

    def __init__(self, x0, y0):
        super().__init__()
        self.x0, self.y0 = x0, y0

    def before_forward(self, strategy, **kwargs):
        if strategy.experience.current_experience == 1:
            x, y, t = strategy.mbatch
            strategy.mbatch = [torch.cat([x, self.x0]), torch.cat([y, self.y0]),
                               torch.cat([t, torch.zeros_like(self.y0)])]


class ForwardTask0InTrainingMode(SupervisedPlugin):
    """What A-GEM/GEM do: a training-mode forward and backward of task 0's samples."""

    def __init__(self, x0, y0):
        super().__init__()
        self.x0, self.y0 = x0, y0

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.experience.current_experience == 1:
            strategy.model.train()
            out = avalanche_forward(strategy.model, self.x0, torch.zeros_like(self.y0))
            nn.functional.cross_entropy(out, self.y0).backward()


class DistilThroughEveryHead(SupervisedPlugin):
    """What LwF does: ``model(x, None)`` (every known task's head) in training mode, added to the loss."""

    def before_backward(self, strategy, **kwargs):
        if strategy.experience.current_experience == 1:
            outputs = avalanche_forward(strategy.model, strategy.mb_x, None)
            strategy.loss += sum(out.logsumexp(1).mean() for out in outputs.values())


@pytest.mark.parametrize("plugin", ["mix", "forward", "distil"])
def test_a_plugin_that_trains_another_task_is_stopped_before_it_touches_task_0(plugin):
    """Plugins not known by name: the minibatch check (replay) or the model's check (a training-mode
    forward of another task) stops them, and task 0 stays bit-identical."""
    benchmark = tensor_benchmark(2)
    data = benchmark.train_stream[0].dataset.eval()
    x0 = torch.stack([data[i][0] for i in range(8)])
    y0 = torch.tensor([data[i][1] for i in range(8)])
    extra = {"mix": lambda: MixInTask0(x0, y0), "forward": lambda: ForwardTask0InTrainingMode(x0, y0),
             "distil": DistilThroughEveryHead}[plugin]()
    model = hat_model()
    strategy = naive(model, [extra, HATPlugin()])
    strategy.train(benchmark.train_stream[0])
    x_test = eval_inputs(benchmark, 0)
    task0, weights0 = logits(model, x_test, 0), state(model)
    error = ValueError if plugin == "mix" else RuntimeError
    with pytest.raises(error, match="carries samples of tasks \\[0\\]: HAT needs no replay" if plugin == "mix"
                       else "training task 1, and a training-mode forward asked for task 0.*HAT needs no replay"):
        strategy.train(benchmark.train_stream[1])
    assert torch.equal(logits(model, x_test, 0), task0)
    head = "head.copies.0"  # task 0's head, its norms' statistics: exactly as after task 0
    assert all(torch.equal(v, weights0[k]) for k, v in model.state_dict().items() if k.startswith(head) or ".copies.0." in k)


def test_forwards_of_other_tasks_in_eval_mode_are_allowed_while_a_task_trains():
    model = hat_model()
    model.train_task = 1
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    assert model(x, 0).shape == (4, 2)
    assert set(model(x, None)) == set(model.known_train_tasks_labels)
    model.train()
    model.mask_scale = 5.0  # what the plugin sets each iteration (None in training is refused)
    assert model(x, 1).shape == (4, 2)
    with pytest.raises(RuntimeError, match="asked for task 0"):
        model(x, torch.tensor([1, 1, 0, 1]))


@pytest.mark.parametrize("make_plugin", [
    lambda: None,
    lambda: EWCPlugin(ewc_lambda=100.0),
    lambda: SynapticIntelligencePlugin(si_lambda=1.0),
], ids=["naive", "ewc", "si"])
@pytest.mark.parametrize("hat_first", [False, True])
def test_naive_ewc_and_si_with_the_hat_plugin_keep_task_0_bit_identical(make_plugin, hat_first):
    benchmark = tensor_benchmark(2)
    other = make_plugin()
    plugins = [HATPlugin()] + ([] if other is None else [other])
    if not hat_first:
        plugins.reverse()
    model = hat_model()
    strategy = naive(model, plugins)
    x_test = eval_inputs(benchmark, 0)
    strategy.train(benchmark.train_stream[0])
    task0 = logits(model, x_test, 0)
    weights = model.backbone.fc.weight.detach().clone()
    strategy.train(benchmark.train_stream[1])
    assert trained_tasks(model) == [0, 1]
    assert not torch.equal(model.backbone.fc.weight, weights)  # task 1 trained shared weights
    assert torch.equal(logits(model, x_test, 0), task0)
    assert model.train_task is None  # only set while the plugin trains


# ---------------------------------------------------------------------- plain trainable parts
class PlainPartsNet(nn.Module):
    """A HAT backbone with parts HAT cannot protect: a plain BatchNorm2d, a bare parameter and a
    shared plain head (it returns logits, so HATMultiTaskModel uses it as it is)."""

    def __init__(self, cfg):
        super().__init__()
        self.hat_config = cfg
        self.num_classes = 2
        self.conv = HATConv2d(3, 8, 3, cfg, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gain = nn.Parameter(torch.ones(()))
        self.fc = HATLinear(8 * 4 * 4, 16, cfg)
        self.head = nn.Linear(16, 2)
        self.relu, self.pool = nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, p: HATPayload) -> torch.Tensor:
        p = self.conv(p).forward_by(self.bn).forward_by(self.relu).forward_by(self.pool).flatten(1)
        p = self.fc(p).forward_by(self.relu)
        return self.head(p.data * self.gain)


def plain_parts_strategy(**kwargs):
    torch.manual_seed(0)
    net = PlainPartsNet(HATConfig(num_tasks=2, mask_init="normal"))
    return HAT(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), train_mb_size=8, train_epochs=2,
               eval_mb_size=64, evaluator=exact_eval_metrics(), **kwargs)


def test_plain_parameters_and_norms_are_listed_by_name_before_the_first_experience():
    strategy = plain_parts_strategy()
    before = state(strategy.model)
    with pytest.raises(ValueError, match=r"backbone\.gain.*backbone\.bn\.weight.*backbone\.head\.weight.*norms with running "
                       r"statistics \['backbone\.bn'\].*TaskIndexedBatchNorm.*plain_parameters=\"freeze\""):
        strategy.train(tensor_benchmark(2).train_stream[0])
    assert same_state(state(strategy.model), before)
    assert trained_tasks(strategy.model) == []


def test_plain_parts_train_with_the_first_task_and_are_frozen_after_it():
    benchmark = tensor_benchmark(2)
    strategy = plain_parts_strategy(plain_parameters="freeze")
    model = strategy.model
    initial = state(model)
    strategy.train(benchmark.train_stream[0])
    after0 = state(model)
    plain = [k for k in after0 if k.startswith(("backbone.bn.", "backbone.head.", "backbone.gain"))]
    trained = [k for k in plain if after0[k].is_floating_point() and not torch.equal(after0[k], initial[k])]
    assert {"backbone.bn.running_mean", "backbone.head.weight", "backbone.gain"} <= set(trained)
    x_test = eval_inputs(benchmark, 0)
    task0 = logits(model, x_test, 0)
    strategy.train(benchmark.train_stream[1])
    after1 = state(model)
    assert all(torch.equal(after1[k], after0[k]) for k in plain)  # weights and running statistics
    assert not torch.equal(after1["backbone.fc.weight"], after0["backbone.fc.weight"])  # task 1 trained
    assert torch.equal(logits(model, x_test, 0), task0)


# -------------------------------------------------------------------------------- task labels
@pytest.mark.parametrize("labels", [1.5, 1.0, torch.tensor([1.5, 1.5]), torch.tensor([1.0, 0.0]),
                                    torch.tensor(1.0), [1.5, 0.0]], ids=["float", "whole-float", "tensor",
                                    "whole-tensor", "0d", "list"])
def test_non_integer_task_labels_are_refused_not_truncated(labels):
    model = hat_model()
    model.eval()
    with pytest.raises(TypeError, match="integer task ids.*1.5 would run task 1"):
        model(torch.randn(2, 3, 8, 8), labels)


def test_fractional_task_labels_are_named_in_the_error():
    model = hat_model()
    with pytest.raises(TypeError, match=r"fractional values \[1.5\]"):
        model.eval()(torch.randn(2, 3, 8, 8), torch.tensor([1.5, 0.0]))


def test_integer_task_labels_of_every_kind_still_work():
    import numpy as np

    model = hat_model().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x, 1)
    for labels in (np.int64(1), torch.tensor(1), torch.tensor([1, 1], dtype=torch.int32), [1, 1], np.array([1, 1])):
        assert torch.equal(model(x, labels), expected)


# ----------------------------------------------------------------------------- divergence error
class ScaledAt:
    """Cross entropy multiplied by ``factor`` at the ``at``-th call after ``arm()``."""

    def __init__(self, at: int, factor: float):
        self.at, self.factor, self.calls = at, factor, None

    def arm(self):
        self.calls = 0

    def __call__(self, out, y):
        loss = nn.functional.cross_entropy(out, y)
        if self.calls is not None:
            self.calls += 1
            if self.calls == self.at:
                return loss * self.factor
        return loss


def test_the_divergence_error_says_when_a_finite_step_already_damaged_the_model():
    """A finite but huge step overflows the weights to inf; the next loss is nan. The error must not
    claim earlier tasks are untouched: it says the model already holds nan or inf, and where."""
    benchmark = tensor_benchmark(2)
    criterion = ScaledAt(2, 1e38)
    model = hat_model()
    strategy = naive(model, [HATPlugin()], criterion=criterion)
    strategy.train(benchmark.train_stream[0])
    criterion.arm()
    with pytest.raises(FloatingPointError) as error:
        strategy.train(benchmark.train_stream[1])
    message = str(error.value)
    assert "untouched" not in message
    assert "stopped before its backward pass" in message
    assert "already holds nan or inf (in backbone." in message and "may be damaged" in message
