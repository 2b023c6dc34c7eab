"""The HAT strategy and HATPlugin in Avalanche's training loop: the guarantees users rely on.

Fast tests on an in-memory task-incremental benchmark; the real SplitCIFAR10/100 and Split
Fashion-MNIST runs and checkpoint resume are in test_training_benchmarks.py.
"""
import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from avalanche.training import Naive
from torch import nn

from avalanche_hat import (
    HAT, HATConfig, HATMultiTaskModel, HATPayload, HATPlugin, capacity_report, hat_param_groups,
    hat_regularization, trained_tasks,
)
from avalanche_hat.mechanism import CosineMaskScale, LinearMaskScale
from avalanche_hat.modules import TaskIndexedLinear
from avalanche_hat.training import HATCapacityMetric, HATCSVLogger, default_hat_evaluator

from cifar_fixtures import TinyHATNet, exact_eval_metrics, tensor_benchmark

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05)  # the original HAT optimizer


def make_strategy(num_tasks=3, plugins=None, evaluator=None, epochs=6, optimizer=sgd, **kwargs):
    """HAT on a TinyHATNet. Embeddings start N(0, 1) (original HAT): in these few iterations the dense
    start would keep every unit for the first task, and later tasks would train their heads only."""
    torch.manual_seed(0)
    net = TinyHATNet(HATConfig(num_tasks=num_tasks, mask_init="normal"))
    kwargs.setdefault("num_classes", 2)
    return HAT(model=net, optimizer=optimizer(net), train_mb_size=8, train_epochs=epochs,
               eval_mb_size=64, plugins=plugins, evaluator=evaluator or exact_eval_metrics(), **kwargs)


def stacked_data(experience):
    data = experience.dataset.eval()
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    return x, y


@torch.no_grad()
def logits(model, x, task):
    model.eval()
    return model(x, torch.full((len(x),), task))


# --------------------------------------------------------------------- end to end, exact
@pytest.fixture(scope="module")
def trained_run():
    """HAT on 3 tasks; the logits of each task's test data recorded right after learning it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    benchmark = tensor_benchmark(3)
    strategy = make_strategy()
    after, results = {}, None
    for experience in benchmark.train_stream:
        if experience.current_experience == 1:
            after["weights after task 0"] = copy.deepcopy(strategy.model.backbone.state_dict())
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream)
        t = experience.current_experience
        after[t] = logits(strategy.model, stacked_data(benchmark.test_stream[t])[0], t)
    torch.set_num_threads(threads)
    return benchmark, strategy, after, results


def test_every_task_is_learned_and_recorded_as_trained(trained_run):
    benchmark, strategy, _, results = trained_run
    matrix = results["EvalStream/Acc_Matrix"]
    assert strategy.trained_tasks == [0, 1, 2]
    assert trained_tasks(strategy.model) == [0, 1, 2]
    assert all(matrix[t, t] >= 0.9 for t in range(3)), matrix


def test_earlier_tasks_keep_bit_identical_outputs_and_exact_accuracy(trained_run):
    benchmark, strategy, after, results = trained_run
    for t in (0, 1):
        x, _ = stacked_data(benchmark.test_stream[t])
        assert torch.equal(logits(strategy.model, x, t), after[t]), f"task {t} changed"
    matrix = results["EvalStream/Acc_Matrix"]
    for t in range(3):
        assert matrix[2, t].item() == matrix[t, t].item()  # exactly, not approximately
    assert results["StreamBWT/eval_phase/test_stream"] == 0.0


def test_later_tasks_trained_shared_weights_so_the_guarantee_is_not_trivial(trained_run):
    _, strategy, after, _ = trained_run
    report = capacity_report(strategy.model)
    assert 0.0 < report.usage(0) < 1.0 and report.owned < 1.0
    before, now = after["weights after task 0"], strategy.model.backbone.state_dict()
    changed = [k for k in before if k.endswith(".weight") and not torch.equal(before[k], now[k])]
    assert {"conv1.weight", "conv2.weight", "fc.weight"} <= set(changed)


def test_mixed_task_minibatch_gives_each_sample_its_own_task_output(trained_run):
    benchmark, strategy, _, _ = trained_run
    xs, tasks = [], []
    for t in range(3):
        x, _ = stacked_data(benchmark.test_stream[t])
        xs.append(x)
        tasks.append(torch.full((len(x),), t))
    x, task_labels = torch.cat(xs), torch.cat(tasks)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, task_labels = x[order], task_labels[order]
    model = strategy.model.eval()
    with torch.no_grad():
        mixed = model(x, task_labels)
        for t in range(3):
            select = task_labels == t
            assert torch.equal(mixed[select], model(x[select], t))


def test_avalanche_evaluates_a_stream_of_mixed_task_minibatches(trained_run):
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    benchmark, strategy, _, results = trained_run
    data = [benchmark.test_stream[t].dataset for t in range(3)]
    mixed = with_task_labels(benchmark_from_datasets(mixed=[data[0].concat(data[1]).concat(data[2])]))
    assert mixed.mixed_stream[0].task_labels == [0, 1, 2]
    accuracy = strategy.eval(mixed.mixed_stream)["Top1_Acc_Stream/eval_phase/mixed_stream"]
    sizes = [len(d) for d in data]
    per_task = [results[f"Top1_Acc_Exp/eval_phase/test_stream/Task{t:03d}/Exp{t:03d}"] for t in range(3)]
    assert accuracy == pytest.approx(sum(a * n for a, n in zip(per_task, sizes)) / sum(sizes), abs=1e-12)


def test_heads_and_embeddings_exist_before_training_and_never_change_in_number(trained_run):
    _, strategy, _, _ = trained_run
    fresh = HATMultiTaskModel(TinyHATNet(HATConfig(num_tasks=3, mask_init="normal")), num_classes=2)
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(fresh) == shapes(strategy.model)
    assert len(fresh.head.copies) == 3 + 1  # one per task, and one for task_id=None
    in_optimizer = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in strategy.model.parameters()}


def test_optimizer_holds_every_parameter_before_the_first_experience():
    strategy = make_strategy()
    in_optimizer = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in strategy.model.parameters()}


def test_optimizer_with_an_embedding_group_gets_the_new_heads_without_losing_its_groups():
    """Adam with the embeddings in their own group (hat_param_groups): the heads HAT adds join the
    optimizer up front (Avalanche's own placement fails with several groups)."""
    benchmark = tensor_benchmark(3)
    torch.manual_seed(0)
    net = TinyHATNet(HATConfig(num_tasks=3, mask_init="normal"))
    optimizer = torch.optim.Adam(hat_param_groups(net, embedding_lr=0.05), lr=1e-2)
    strategy = HAT(model=net, optimizer=optimizer, num_classes=2, train_mb_size=8, train_epochs=6,
                   evaluator=exact_eval_metrics())
    assert len(optimizer.param_groups) == 3 and optimizer.param_groups[1]["lr"] == 0.05
    assert {id(p) for p in optimizer.param_groups[2]["params"]} == {id(p) for p in strategy.model.head.parameters()}
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream[:2])
    matrix = results["EvalStream/Acc_Matrix"]
    assert matrix[1, 0].item() == matrix[0, 0].item() >= 0.9 and matrix[1, 1] >= 0.9


# --------------------------------------------------------------------------- the loop
class Recorder(SupervisedPlugin):
    """Records what the HAT plugin set up, at the points where the model and the loss use it."""

    def __init__(self):
        super().__init__()
        self.train_scales, self.eval_scales, self.losses, self.state_sizes = [], [], [], []

    def before_training_epoch(self, strategy, **kwargs):
        self.state_sizes.append(len(strategy.optimizer.state))

    def before_forward(self, strategy, **kwargs):
        self.train_scales.append(strategy.model.mask_scale)

    def before_eval_forward(self, strategy, **kwargs):
        self.eval_scales.append(strategy.model.mask_scale)

    def after_backward(self, strategy, **kwargs):
        model = strategy.model
        ce = strategy._criterion(strategy.mb_output, strategy.mb_y)
        reg = hat_regularization(model, int(strategy.mb_task_id[0]), model.mask_scale)
        self.losses.append((strategy.loss.detach().clone(), ce.detach(), reg.detach()))


def test_user_plugins_are_kept_and_their_list_is_not_changed():
    recorder = Recorder()
    plugins = [recorder]
    strategy = make_strategy(plugins=plugins)
    assert plugins == [recorder]
    assert recorder in strategy.plugins
    assert sum(isinstance(p, HATPlugin) for p in strategy.plugins) == 1
    strategy.train(tensor_benchmark(3).train_stream[0])
    assert recorder.train_scales  # the user's callbacks ran


def test_mask_scale_follows_the_cosine_schedule_per_epoch_and_masks_are_binary_at_eval():
    recorder = Recorder()
    benchmark = tensor_benchmark(3)
    strategy = make_strategy(plugins=[recorder], epochs=2, eval_every=1)
    strategy.train(benchmark.train_stream[0], eval_streams=[benchmark.test_stream[0]])
    batches = 4  # 32 samples, minibatches of 8
    expected = [CosineMaskScale(400.0).at(b, batches) for b in range(batches)] * 2
    assert recorder.train_scales == pytest.approx(expected)
    assert max(recorder.train_scales) == 400.0 and min(recorder.train_scales) < 400.0
    assert recorder.eval_scales and all(s is None for s in recorder.eval_scales)


def test_linear_schedule_over_the_experience():
    recorder = Recorder()
    strategy = make_strategy(plugins=[recorder], epochs=2, schedule="linear", scale_unit="experience",
                             max_mask_scale=100.0)
    strategy.train(tensor_benchmark(3).train_stream[0])
    expected = [LinearMaskScale(100.0).at(b, 8) for b in range(8)]
    assert recorder.train_scales == pytest.approx(expected)


def test_regularisation_term_is_added_to_the_loss_with_its_coefficient():
    recorder = Recorder()
    strategy = make_strategy(plugins=[recorder], epochs=1, reg_coef=0.5)
    strategy.train(tensor_benchmark(3).train_stream[0])
    assert recorder.losses
    for loss, ce, reg in recorder.losses:
        assert reg.item() > 0
        assert torch.allclose(loss, ce + 0.5 * reg, atol=1e-5)


def test_default_coefficient_is_the_original_hat_one():
    assert HATPlugin().reg_coef == 0.75
    assert make_strategy().hat_plugin.reg_coef == 0.75


def test_optimizer_state_is_reset_at_every_experience():
    recorder = Recorder()
    benchmark = tensor_benchmark(3)
    momentum = lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)  # noqa: E731
    strategy = make_strategy(plugins=[recorder], epochs=2, optimizer=momentum)
    strategy.train(benchmark.train_stream[0])
    assert len(strategy.optimizer.state) > 0  # momentum buffers exist after an experience
    strategy.train(benchmark.train_stream[1])
    assert recorder.state_sizes == [0, len(strategy.optimizer.state), 0, len(strategy.optimizer.state)]


# ------------------------------------------------------------------------------ bad input
class _InnerOptimizers(torch.optim.Optimizer):
    """A wrapper whose state lives in an inner optimizer (the experience reset misses it)."""

    def __init__(self, params):
        params = list(params)
        self.inner = torch.optim.Adam(params, lr=1e-2)
        super().__init__(params, {})

    def step(self, closure=None):
        self.inner.step()

    def zero_grad(self, set_to_none=True):
        self.inner.zero_grad(set_to_none)


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.ASGD(p, lr=0.1, lambd=0.05),
    _InnerOptimizers,
], ids=["sgd", "adamw", "adam", "asgd", "inner"])
def test_any_torch_optimizer_keeps_task_0_bit_identical_through_the_hat_strategy(make_optimizer):
    benchmark = tensor_benchmark(2)
    torch.manual_seed(0)
    net = TinyHATNet(HATConfig(num_tasks=2, mask_init="normal"))
    strategy = HAT(model=net, optimizer=make_optimizer(net.parameters()), num_classes=2, train_mb_size=8,
                   train_epochs=2, evaluator=exact_eval_metrics())
    model = strategy.model
    data = benchmark.test_stream[0].dataset.eval()
    x = torch.stack([data[i][0] for i in range(len(data))])
    strategy.train(benchmark.train_stream[0])
    model.eval()
    with torch.no_grad():
        before = model(x, 0)
    weights = model.backbone.fc.weight.detach().clone()
    strategy.train(benchmark.train_stream[1])
    assert not torch.equal(model.backbone.fc.weight, weights)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, 0), before)


def test_an_optimizer_outside_torch_optim_is_refused_by_name_before_any_weight_moves():
    class Manual:  # updates parameters itself: no torch.optim hook would see its steps
        def __init__(self, params):
            self.param_groups = [{"params": list(params)}]

        def step(self):
            pass

        def zero_grad(self, set_to_none=True):
            pass

    model = HATMultiTaskModel(TinyHATNet(HATConfig(num_tasks=3)), num_classes=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="Manual is not a torch.optim.Optimizer"):
        HAT(model=model, optimizer=Manual(model.parameters()), num_classes=2)
    strategy = Naive(model=model, optimizer=Manual(model.parameters()), plugins=[HATPlugin()], train_mb_size=8,
                     evaluator=exact_eval_metrics())
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        strategy.train(tensor_benchmark(3).train_stream[0])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_class_incremental_stream_is_refused_because_hat_needs_task_ids():
    benchmark = tensor_benchmark(3, task_labels=False)  # every experience has task label 0
    strategy = make_strategy(num_classes=6, epochs=1)
    before = copy.deepcopy(strategy.model.state_dict())
    with pytest.raises(ValueError, match="HAT needs task ids") as error:
        strategy.train(benchmark.train_stream[0])
    assert "return_task_id=True" in str(error.value)
    after = strategy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before any step


def test_a_task_already_learned_is_refused_unless_revisited_on_purpose():
    benchmark = tensor_benchmark(3)
    strategy = make_strategy(epochs=1)
    strategy.train(benchmark.train_stream[0])
    before = copy.deepcopy(strategy.model.state_dict())
    with pytest.raises(ValueError, match=r"task label 0, which this HAT model has already learned"):
        strategy.train(benchmark.train_stream[0])
    after = strategy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing learned was touched


class Interrupt(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.armed = True

    def after_training_iteration(self, strategy, **kwargs):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt


def test_an_interrupted_experience_is_not_marked_trained_and_can_be_trained_again():
    benchmark = tensor_benchmark(3)
    strategy = make_strategy(plugins=[Interrupt()], epochs=1)
    with pytest.raises(KeyboardInterrupt):
        strategy.train(benchmark.train_stream[0])
    assert strategy.trained_tasks == []
    strategy.train(benchmark.train_stream[0])
    assert strategy.trained_tasks == [0]


@pytest.mark.parametrize("size", [8, 10], ids=["divides", "remainder"])
def test_online_stream_with_task_boundaries_learns_each_task_over_its_sub_experiences(size):
    """32 samples per task in sub-experiences of ``size``. Avalanche 0.6.0 flags no sub-experience
    as last when the size divides the data: the task must still be protected when it ends."""
    from avalanche.benchmarks.scenarios.online import split_online_stream
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    benchmark = tensor_benchmark(2)
    online = split_online_stream(benchmark.train_stream, experience_size=size, access_task_boundaries=True)
    strategy = make_strategy(num_tasks=2, epochs=2)
    with pytest.raises(ValueError, match="with_task_labels"):  # these sub-experiences lost them
        strategy.train(next(iter(online)))
    online = with_task_labels(online)
    x0, _ = stacked_data(benchmark.test_stream[0])
    seen = []
    for sub in online:
        strategy.train(sub)
        seen.append((sub.task_label, strategy.trained_tasks))
        if seen[-1] == (0, [0]):
            task0 = logits(strategy.model, x0, 0)
    assert seen[0] == (0, [])  # not protected halfway through its experience
    assert seen[-1] == (1, [0, 1])
    assert torch.equal(logits(strategy.model, x0, 0), task0)


def test_task_label_beyond_the_model_is_refused_before_training():
    benchmark = tensor_benchmark(3)
    strategy = make_strategy(num_tasks=2, epochs=1)
    with pytest.raises(ValueError, match=r"task label 2 is outside the 2 tasks"):
        strategy.train(benchmark.train_stream[2])


def test_revisiting_a_task_on_purpose_keeps_every_other_task_bit_identical():
    benchmark = tensor_benchmark(3)
    strategy = make_strategy(allow_task_revisit=True, epochs=2)
    strategy.train(benchmark.train_stream[0])
    strategy.train(benchmark.train_stream[1])
    x0, _ = stacked_data(benchmark.test_stream[0])
    x1, _ = stacked_data(benchmark.test_stream[1])
    task0, task1 = logits(strategy.model, x0, 0), logits(strategy.model, x1, 1)
    strategy.train(benchmark.train_stream[0])  # inside retraining(0), which the plugin opens
    assert not torch.equal(logits(strategy.model, x0, 0), task0), "task 0 did not train again"
    assert torch.equal(logits(strategy.model, x1, 1), task1)
    assert strategy.trained_tasks == [0, 1]
    with pytest.raises(RuntimeError, match="task 0 is marked trained"):  # the block ended with the experience
        strategy.model.train()
        strategy.model.mask_scale = 5.0
        strategy.model(x0, 0)


def test_a_revisit_forward_that_raises_leaves_no_retraining_block_open():
    """allow_task_revisit trains a trained task inside retraining(task): a forward that raises
    midway (an interrupt) must not leave that block open for training outside the strategy."""
    benchmark = tensor_benchmark(3)
    strategy = make_strategy(allow_task_revisit=True, epochs=1)
    strategy.train(benchmark.train_stream[0])
    x0, _ = stacked_data(benchmark.test_stream[0])
    task0 = logits(strategy.model, x0, 0)

    def interrupt(module, inputs):
        raise KeyboardInterrupt

    hook = strategy.model.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        strategy.train(benchmark.train_stream[0])  # revisits task 0; its first forward raises
    hook.remove()
    assert "forward" not in strategy.__getstate__()  # a checkpoint taken now holds no per-experience wrapper
    strategy.model.train()
    strategy.model.mask_scale = 5.0
    with pytest.raises(RuntimeError, match="task 0 is marked trained"):
        strategy.model(x0, 0)
    assert torch.equal(logits(strategy.model, x0, 0), task0)
    strategy.train(benchmark.train_stream[0])  # and the revisit itself still works afterwards
    assert not torch.equal(logits(strategy.model, x0, 0), task0)
    assert "forward" not in vars(strategy)  # the per-experience wrapper is gone with the experience


class LazyHeads(MultiTaskModule):
    def __init__(self):
        super().__init__()
        self.mask_scale = None
        self.backbone = TinyHATNet(HATConfig(num_tasks=3))
        self.classifier = MultiHeadClassifier(32, 2)

    def forward_single_task(self, x, task_label):
        return self.classifier(self.backbone(HATPayload(x, task_id=task_label, mask_scale=self.mask_scale)).data, task_label)


def test_lazily_created_heads_are_refused():
    model = LazyHeads()
    with pytest.raises(ValueError, match="TaskIndexedLinear"):
        HAT(model=model, optimizer=sgd(model))


def test_models_hat_cannot_protect_are_refused_with_what_to_do():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 2))
    with pytest.raises(ValueError, match="no HAT layers"):
        HAT(model=plain, optimizer=sgd(plain), num_classes=2)
    features = TinyHATNet(HATConfig(num_tasks=3))
    with pytest.raises(ValueError, match="pass num_classes"):
        HAT(model=features, optimizer=sgd(features))


class OwnMultiTaskModel(MultiTaskModule):
    """A HAT-aware MultiTaskModule written by a user: reads mask_scale, one head per task up front."""

    def __init__(self, with_scale=True):
        super().__init__()
        if with_scale:
            self.mask_scale = None
        cfg = HATConfig(num_tasks=3)
        self.backbone = TinyHATNet(cfg)
        self.heads = TaskIndexedLinear(32, 2, cfg)

    def forward_single_task(self, x, task_label):
        scale = self.mask_scale if self.training else None
        return self.heads(self.backbone(HATPayload(x, task_id=int(task_label), mask_scale=scale)))


def test_a_hat_aware_multitask_module_is_used_as_it_is():
    benchmark = tensor_benchmark(3)
    torch.manual_seed(0)
    model = OwnMultiTaskModel()
    strategy = HAT(model=model, optimizer=sgd(model), train_mb_size=8, train_epochs=4,
                   evaluator=exact_eval_metrics())
    assert strategy.model is model
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream[:2])
    matrix = results["EvalStream/Acc_Matrix"]
    assert matrix[1, 0].item() == matrix[0, 0].item() >= 0.9
    no_scale = OwnMultiTaskModel(with_scale=False)
    with pytest.raises(TypeError, match="mask_scale"):
        HAT(model=no_scale, optimizer=sgd(no_scale))


def test_ownership_respecting_weight_decay_keeps_earlier_tasks_bit_identical():
    benchmark = tensor_benchmark(3)
    strategy = make_strategy(weight_decay=1e-3, epochs=3)
    strategy.train(benchmark.train_stream[0])
    x0, _ = stacked_data(benchmark.test_stream[0])
    task0 = logits(strategy.model, x0, 0)
    hat_weights = lambda: {n: p.detach().clone() for n, p in strategy.model.named_parameters()  # noqa: E731
                           if n.endswith("weight") and "conv" in n or ".fc." in n}
    before = hat_weights()
    strategy.train(benchmark.train_stream[1])
    assert torch.equal(logits(strategy.model, x0, 0), task0)
    after = hat_weights()
    assert any(not torch.equal(before[n], after[n]) for n in before)  # free units did train


class DivergesAt:
    """Cross entropy that turns nan at the ``at``-th call after ``arm()`` (a diverged step)."""

    def __init__(self, at: int):
        self.at, self.calls = at, None

    def arm(self):
        self.calls = 0

    def __call__(self, out, y):
        loss = nn.functional.cross_entropy(out, y)
        if self.calls is not None:
            self.calls += 1
            if self.calls == self.at:
                return loss * float("nan")
        return loss


@pytest.mark.parametrize("check_finite", [True, False])
def test_a_diverged_step_stops_training_before_it_reaches_earlier_tasks(check_finite):
    """A nan loss in task 1 stops training before its backward pass: task 0 stays bit-identical and
    task 1 keeps its last finite weights. Without the check the step goes through, and task 0's
    outputs turn nan although none of its weights had a gradient (0 * nan through the free units)."""
    benchmark = tensor_benchmark(3)
    criterion = DivergesAt(3)
    strategy = make_strategy(epochs=2, criterion=criterion, check_finite=check_finite)
    strategy.train(benchmark.train_stream[0])
    x0, _ = stacked_data(benchmark.test_stream[0])
    task0 = logits(strategy.model, x0, 0)
    criterion.arm()
    if check_finite:
        with pytest.raises(FloatingPointError, match=r"loss of task 1 is nan at epoch 0, iteration 2 .*stopped before its backward pass.*"
                           r"every parameter and buffer of the model is finite"):
            strategy.train(benchmark.train_stream[1])
        assert torch.equal(logits(strategy.model, x0, 0), task0)
        assert torch.isfinite(torch.cat([p.detach().flatten() for p in strategy.model.parameters()])).all()
        assert trained_tasks(strategy.model) == [0]  # task 1 was not marked trained
    else:
        strategy.train(benchmark.train_stream[1])
        assert torch.isnan(logits(strategy.model, x0, 0)).any()


# ------------------------------------------------------------------------------ metrics
def test_default_evaluator_reports_capacity_and_loggers_print_it():
    from avalanche.logging import TextLogger

    evaluator = default_hat_evaluator()
    assert any(isinstance(m, HATCapacityMetric) for m in evaluator.metrics)
    out = io.StringIO()
    evaluator.loggers = [TextLogger(out)]
    strategy = make_strategy(evaluator=evaluator, epochs=1)
    benchmark = tensor_benchmark(3)
    strategy.train(benchmark.train_stream[0])
    strategy.eval(benchmark.test_stream[:1])
    last = strategy.evaluator.get_last_metrics()
    usage = last["HATCapacity/overall/Task000"]
    assert 0.0 < usage <= 1.0
    assert last["HATCapacity/overall/owned"] == pytest.approx(usage)
    assert "HATCapacity/overall/Task000" in out.getvalue()


def test_capacity_metric_reaches_a_csv_logger(tmp_path):
    import csv

    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    logger = HATCSVLogger(str(tmp_path))
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), HATCapacityMetric(), loggers=[logger])
    strategy = make_strategy(evaluator=evaluator, epochs=1)
    benchmark = tensor_benchmark(3)
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
        strategy.eval(benchmark.test_stream[:2])
    restored = pickle.loads(pickle.dumps(logger))  # checkpoints pickle the loggers: files reopen
    assert restored.metrics_path == logger.metrics_path
    restored.close()
    logger.close()
    with open(tmp_path / "hat_capacity.csv") as f:
        rows = list(csv.DictReader(f))
    overall = {(r["training_exp"], r["metric"]): float(r["value"]) for r in rows}
    assert 0 < overall[("0", "HATCapacity/overall/Task000")] <= 1
    assert 0 < overall[("1", "HATCapacity/overall/Task001")] <= 1
    assert ("1", "HATCapacity/layer/backbone.conv1/Task001") in overall
    # Avalanche's own CSV files are still written as usual.
    with open(tmp_path / "eval_results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


# -------------------------------------------------------------------------- checkpoints
def test_checkpoint_pickles_even_when_torch_optim_hides_its_submodules(tmp_path, monkeypatch):
    """torch.optim deletes its submodules (``del sgd``): dill then pickles SGD by value and fails."""
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint

    benchmark = tensor_benchmark(3)
    strategy = make_strategy(epochs=1)
    strategy.train(benchmark.train_stream[0])
    monkeypatch.delattr(torch.optim, "sgd", raising=False)
    save_checkpoint(strategy, str(tmp_path / "hat.pkl"))  # Avalanche's own function
    fresh = make_strategy(epochs=1)
    fresh, next_experience = maybe_load_checkpoint(fresh, str(tmp_path / "hat.pkl"))
    assert next_experience == 1
    assert fresh.trained_tasks == [0]
    saved, loaded = strategy.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_checkpoint_of_another_strategy_with_the_plugin(tmp_path, monkeypatch):
    from avalanche_hat.training import maybe_load_checkpoint, save_checkpoint

    model = HATMultiTaskModel(TinyHATNet(HATConfig(num_tasks=3)), num_classes=2)
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                     plugins=[HATPlugin()], train_mb_size=8, evaluator=exact_eval_metrics())
    strategy.train(tensor_benchmark(3).train_stream[0])
    monkeypatch.delattr(torch.optim, "adam", raising=False)
    save_checkpoint(strategy, str(tmp_path / "naive.pkl"))
    strategy, next_experience = maybe_load_checkpoint(strategy, str(tmp_path / "naive.pkl"))
    assert next_experience == 1 and trained_tasks(strategy.model) == [0]


def test_import_avalanche_hat_does_not_import_avalanche():
    code = "import sys, avalanche_hat; assert 'avalanche' not in sys.modules, 'avalanche imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ devices
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_the_gpu_with_the_device_argument():
    benchmark = tensor_benchmark(3)
    strategy = make_strategy(device="cuda", epochs=4)
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream[:2])
    assert next(strategy.model.parameters()).is_cuda
    matrix = results["EvalStream/Acc_Matrix"]
    assert matrix[1, 0].item() == matrix[0, 0].item() >= 0.9
