"""Class-incremental HAT: training on streams whose experiences all carry task label 0, task-id
prediction at test time in one batched pass, calibrated scores. The guarantees users rely on.

Fast tests on an in-memory stream; real Split Fashion-MNIST is in test_class_incremental_fmnist.py.
"""
import copy
import pickle

import pytest
import timm
import torch
from avalanche.core import SupervisedPlugin
from torch import nn
from torch.utils.data import DataLoader

import avalanche_hat.timm_models  # noqa: F401  (registers the hat_* networks)
from avalanche_hat import HAT, HATConfig, HATMultiTaskModel, HATPayload, HATPlugin, trained_tasks
from avalanche_hat.bench.networks import HATCNN, HATMLP
from avalanche_hat.modules import HATLinear, TaskIndexedBatchNorm2d
from avalanche_hat.training import HATClassIncrementalModel, evaluate_task_inference, for_each_task
from avalanche_hat.training.class_incremental import SCORES, UNSEEN_LOGIT

from cifar_fixtures import TinyHATNet, exact_eval_metrics, tensor_benchmark

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]


def cil_strategy(num_tasks=3, epochs=4, plugins=None, **model_kwargs):
    torch.manual_seed(0)
    net = TinyHATNet(HATConfig(num_tasks=num_tasks, mask_init="normal"))
    model_kwargs.setdefault("calibration_fraction", 0.25)
    model = HATClassIncrementalModel(net, num_classes=2 * num_tasks, classes_per_task=2, **model_kwargs)
    strategy = HAT(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                   train_epochs=epochs, eval_mb_size=64, plugins=plugins, evaluator=exact_eval_metrics())
    return strategy, model


def stacked(experience):
    data = experience.dataset.eval()
    return (torch.stack([data[i][0] for i in range(len(data))]), torch.tensor([data[i][1] for i in range(len(data))]))


@pytest.fixture(scope="module")
def cil_run():
    """HAT on a 3-experience class-incremental stream; after each experience, the per-task output of
    that task on its test data and its calibration statistics are recorded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    benchmark = tensor_benchmark(3, task_labels=False, per_class=32)
    strategy, model = cil_strategy()
    after, outputs = {}, []
    for experience in benchmark.train_stream:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream)
        t = experience.current_experience
        x, _ = stacked(benchmark.test_stream[t])
        model.eval()
        with torch.no_grad():
            after[t] = (model.forward_task(x, t), model.score_mean[t].clone(), model.score_std[t].clone())
            outputs.append(model(stacked(benchmark.test_stream[0])[0]))
    torch.set_num_threads(threads)
    return benchmark, strategy, model, after, outputs, results


# ------------------------------------------------------------------------------ training
def test_every_experience_of_a_task_label_0_stream_is_its_own_hat_task(cil_run):
    benchmark, _, model, _, _, _ = cil_run
    assert all(e.task_labels == [0] for e in benchmark.train_stream)
    assert trained_tasks(model) == [0, 1, 2]
    for e in benchmark.train_stream:
        assert model.classes_of(e.current_experience) == sorted(e.classes_in_this_experience)
    assert bool(model.task_calibrated.all())


def test_outputs_are_log_probabilities_over_the_classes_seen_so_far(cil_run):
    benchmark, _, model, _, outputs, _ = cil_run
    after_first = outputs[0]
    seen = sorted(benchmark.train_stream[0].classes_in_this_experience)
    unseen = [c for c in range(6) if c not in seen]
    assert after_first.shape[1] == 6
    assert torch.all(after_first[:, unseen] == UNSEEN_LOGIT)
    assert torch.allclose(after_first[:, seen].exp().sum(1), torch.ones(len(after_first)), atol=1e-5)
    assert torch.allclose(outputs[-1].exp().sum(1), torch.ones(len(outputs[-1])), atol=1e-5)


def test_avalanche_accuracy_is_the_class_incremental_accuracy_and_every_task_is_recognised(cil_run):
    benchmark, _, model, _, _, results = cil_run
    model.eval()
    hits = total = 0
    for e in benchmark.test_stream:
        x, y = stacked(e)
        with torch.no_grad():
            hits += int((model(x).argmax(1) == y).sum())
        total += len(y)
    stream = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert stream == pytest.approx(hits / total)
    final = results["EvalStream/Acc_Matrix"][-1]
    assert stream > 0.75 and bool((final > 0.5).all()), final  # chance: 1/6; one task only: 1/3


def test_earlier_tasks_keep_bit_identical_outputs_and_calibration(cil_run):
    benchmark, _, model, after, _, _ = cil_run
    model.eval()
    for t in (0, 1):
        x, _ = stacked(benchmark.test_stream[t])
        logits, mean, std = after[t]
        with torch.no_grad():
            assert torch.equal(model.forward_task(x, t), logits)
        assert torch.equal(model.score_mean[t], mean) and torch.equal(model.score_std[t], std)


def test_known_task_ids_still_give_task_incremental_predictions(cil_run):
    benchmark, _, model, _, _, _ = cil_run
    model.eval()
    for e in benchmark.test_stream:
        x, y = stacked(e)
        with torch.no_grad():
            accuracy = (model.forward_task(x, e.current_experience).argmax(1) == y).float().mean()
        assert accuracy > 0.9


class Spy(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def before_backward(self, strategy, **kwargs):
        self.shapes.append((len(strategy.mb_x), len(strategy.mb_y), tuple(strategy.mb_output.shape)))


def test_negatives_reach_the_loss_but_not_the_criterion_or_the_metrics():
    benchmark = tensor_benchmark(2, task_labels=False)
    spy = Spy()
    strategy, model = cil_strategy(num_tasks=2, epochs=1, plugins=[spy])
    strategy.train(benchmark.train_stream[0])
    assert spy.shapes and all(n == m == out[0] and out[1] == 4 + 1 for n, m, out in spy.shapes)


def test_training_holds_out_the_calibration_samples():
    benchmark = tensor_benchmark(2, task_labels=False, per_class=20)  # 40 samples per experience
    seen = []

    class Count(SupervisedPlugin):
        def after_training_iteration(self, strategy, **kwargs):
            seen.append(len(strategy.mb_y))

    strategy, _ = cil_strategy(num_tasks=2, epochs=1, plugins=[Count()], calibration_fraction=0.25)
    strategy.train(benchmark.train_stream[0])
    assert sum(seen) == 30


# -------------------------------------------------------------------------- refusals
def test_task_incremental_models_still_refuse_a_class_incremental_stream():
    benchmark = tensor_benchmark(3, task_labels=False)
    torch.manual_seed(0)
    net = TinyHATNet(HATConfig(num_tasks=3))
    strategy = HAT(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), num_classes=6,
                   train_mb_size=8, evaluator=exact_eval_metrics())
    with pytest.raises(ValueError, match="HAT needs task ids") as error:
        strategy.train(benchmark.train_stream[0])
    assert "HATClassIncrementalModel" in str(error.value)


@pytest.mark.parametrize("mode", [True, False])
def test_a_plugin_mode_that_contradicts_the_model_is_refused_before_any_step(mode):
    from avalanche.training import Naive

    benchmark = tensor_benchmark(3, task_labels=not mode)
    torch.manual_seed(0)
    net = TinyHATNet(HATConfig(num_tasks=3))
    model = (HATMultiTaskModel(net, num_classes=2) if mode
             else HATClassIncrementalModel(net, num_classes=6, classes_per_task=2))
    before = copy.deepcopy(model.state_dict())
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                     plugins=[HATPlugin(class_incremental=mode)], evaluator=exact_eval_metrics())
    with pytest.raises(ValueError, match="class_incremental="):
        strategy.train(benchmark.train_stream[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_experience_with_more_classes_than_the_heads_is_refused():
    benchmark = tensor_benchmark(2, classes_per_task=3, task_labels=False)
    torch.manual_seed(0)
    model = HATClassIncrementalModel(TinyHATNet(HATConfig(num_tasks=2)), num_classes=6, classes_per_task=2)
    strategy = HAT(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                   evaluator=exact_eval_metrics())
    with pytest.raises(ValueError, match="classes_per_task >= 3"):
        strategy.train(benchmark.train_stream[0])
    assert trained_tasks(model) == []


def test_training_mode_forward_without_the_plugin_is_a_clear_error():
    model = HATClassIncrementalModel(TinyHATNet(HATConfig(num_tasks=2)), num_classes=4, classes_per_task=2)
    with pytest.raises(RuntimeError, match="HATPlugin"):
        model(torch.randn(2, 3, 8, 8))


# ----------------------------------------------------------------------- calibration
def test_a_later_head_with_higher_scores_does_not_win_once_scores_are_calibrated(cil_run):
    """Task 2's head given +20 on every logit (its energy score rises by 20 on every input): on raw
    scores it takes nearly every input; calibrated with statistics of its own data (measured again
    for the changed head), every prediction is what it was."""
    benchmark, _, trained, _, _, _ = cil_run
    model = copy.deepcopy(trained)
    model.eval()
    x = torch.cat([stacked(e)[0] for e in benchmark.test_stream])
    own_data = DataLoader(benchmark.train_stream[2].dataset.eval(), batch_size=64)
    model.record_task_statistics(2, own_data)
    calibrated_before = model.predict_task(x, "energy")
    with torch.no_grad():
        model.head.copies[2].bias.add_(20.0)
    model.record_task_statistics(2, own_data)
    raw = model.predict_task(x, "energy", calibrated=False)
    assert (raw == 2).float().mean() > 0.95
    assert torch.equal(model.predict_task(x, "energy"), calibrated_before)


def test_calibration_travels_with_state_dict_pickle_and_deepcopy(cil_run):
    benchmark, _, model, _, _, _ = cil_run
    model.eval()
    x, _ = stacked(benchmark.test_stream[1])
    with torch.no_grad():
        expected = model(x)
    torch.manual_seed(123)
    fresh = HATClassIncrementalModel(TinyHATNet(HATConfig(num_tasks=3, mask_init="normal")), num_classes=6,
                                     classes_per_task=2, calibration_fraction=0.25)
    fresh.load_state_dict(model.state_dict())
    for clone in (fresh, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.eval()
        with torch.no_grad():
            assert torch.equal(clone(x), expected)


def test_temperature_zero_picks_the_task_first_then_the_class(cil_run):
    benchmark, _, trained, _, _, _ = cil_run
    model = copy.deepcopy(trained)
    model.eval()
    model.task_temperature = 0.0
    x, _ = stacked(benchmark.test_stream[2])
    with torch.no_grad():
        predicted_class = model(x).argmax(1)
        predicted_task = model.predict_task(x)
    owner = {c: t for t in range(3) for c in model.classes_of(t)}
    assert [owner[int(c)] for c in predicted_class] == predicted_task.tolist()


# ------------------------------------------------------------------------ batched pass
def _randomise(net: nn.Module, cfg: HATConfig) -> None:
    """Distinct masks and norm statistics per task, so that tasks really differ."""
    torch.manual_seed(1)
    for m in net.modules():
        if hasattr(m, "mask_embedding"):
            m.mask_embedding.data.normal_()
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
            m.weight.data.normal_()
            m.bias.data.normal_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


NETWORKS = {
    "tiny-bn": (lambda cfg: TinyHATNet(cfg), (5, 3, 8, 8)),
    "mlp": (lambda cfg: HATMLP(1, 28, cfg, width=64), (5, 1, 28, 28)),
    "cnn": (lambda cfg: HATCNN(1, 28, cfg, width=64), (5, 1, 28, 28)),
    "resnet18s": (lambda cfg: timm.create_model("hat_resnet18s", hat_config=cfg, num_classes=0), (2, 3, 32, 32)),
    "vit": (lambda cfg: timm.create_model("hat_vit_tiny_patch16_224", hat_config=cfg, num_classes=0, img_size=32),
            (2, 3, 32, 32)),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("name", list(NETWORKS))
def test_one_batched_pass_gives_what_separate_forwards_give(name):
    build, shape = NETWORKS[name]
    cfg = HATConfig(num_tasks=4)
    net = build(cfg)
    _randomise(net, cfg)
    model = HATClassIncrementalModel(net, num_classes=8, classes_per_task=2, reject_head=True)
    with torch.no_grad():
        for t in range(4):
            model.head.copies[t].weight.normal_()
    model.eval()
    x = torch.randn(*shape)
    tasks = [0, 2, 3]
    with torch.no_grad():
        batched = for_each_task(model, lambda t: model.task_outputs(x, t), tasks)
        separate = [model.task_outputs(x, t) for t in tasks]
    for i, (features, logits) in enumerate(separate):
        assert not torch.equal(separate[0][1], separate[-1][1])  # the tasks differ
        assert torch.allclose(batched[0][i], features, rtol=1e-4, atol=1e-5)
        assert torch.allclose(batched[1][i], logits, rtol=1e-4, atol=1e-5)


def test_batched_pass_refuses_training_mode():
    model = HATClassIncrementalModel(TinyHATNet(HATConfig(num_tasks=2)), num_classes=4, classes_per_task=2)
    with pytest.raises(RuntimeError, match="eval"):
        for_each_task(model, lambda t: model.task_outputs(torch.randn(2, 3, 8, 8), t), [0, 1])


class PlainHeadsNet(nn.Module):
    """Per-task state outside HAT layers: a plain ModuleList indexed by the task id."""

    def __init__(self, cfg):
        super().__init__()
        self.fc = HATLinear(12, 6, cfg)
        self.per_task = nn.ModuleList(nn.Linear(6, 6) for _ in range(cfg.num_tasks))
        self.num_features = 6

    def forward(self, p: HATPayload) -> torch.Tensor:
        return self.per_task[p.task_id](self.fc(p.flatten(1)).data)


def test_a_network_with_per_task_state_elsewhere_is_evaluated_task_by_task_with_a_warning():
    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=2, mask_init="normal")
    model = HATClassIncrementalModel(PlainHeadsNet(cfg), num_classes=4, classes_per_task=2, task_score="energy")
    for t, classes in enumerate(([0, 1], [2, 3])):
        model.register_task(t, classes)
    for t in range(2):
        for m in model.modules():
            if hasattr(m, "hat_trained"):
                m.hat_trained[t] = True
    model.eval()
    x = torch.randn(4, 12)
    with pytest.warns(UserWarning, match="per-task state"):
        features, logits = model.all_task_outputs(x)
    assert model.batched is False
    for t in range(2):
        assert torch.equal(logits[t], model.task_outputs(x, t)[1])


def test_every_score_is_available_and_finite(cil_run):
    benchmark, _, model, _, _, _ = cil_run
    model.eval()
    x, _ = stacked(benchmark.test_stream[0])
    with torch.no_grad():
        features, logits = model.all_task_outputs(x)
        scores = model.task_scores(features, logits, model.inference_tasks())
    assert set(scores) == set(SCORES)
    assert all(s.shape == (3, len(x)) and bool(torch.isfinite(s).all()) for s in scores.values())


def test_mahalanobis_on_the_active_features_is_the_full_regularised_quadratic_form(cil_run):
    """The score skips the features a task never sets (masked or dead units) and adds their
    ``|f|^2 / ridge``: the same as ``(f - mu)^T (S + ridge I)^-1 (f - mu)`` over all features."""
    benchmark, _, trained, _, _, _ = cil_run
    model = copy.deepcopy(trained)
    model.eval()
    task = 1
    data = benchmark.train_stream[task].dataset.eval()
    model.record_task_statistics(task, DataLoader(data, batch_size=64))
    x, y = stacked(benchmark.train_stream[task])
    with torch.no_grad():
        f = model.task_outputs(x, task)[0].double()
    classes = model.classes_of(task)
    means = torch.stack([f[y == c].mean(0) for c in classes])
    centred = f - means[torch.tensor([classes.index(int(c)) for c in y])]
    covariance = centred.T @ centred / len(f)
    ridge = model.covariance_shrinkage * covariance.diagonal().mean()
    precision = torch.linalg.inv(covariance + ridge * torch.eye(len(covariance), dtype=torch.float64))
    assert not bool(model.feature_active[task].all())  # some features are off for this task
    probe = torch.cat([stacked(e)[0] for e in benchmark.test_stream])
    with torch.no_grad():
        features, logits = model.all_task_outputs(probe, [task])
        features = features + torch.rand(features.shape, generator=torch.Generator().manual_seed(0))  # all set
        score = model.task_scores(features, logits, [task], ["mahalanobis"])["mahalanobis"][0].double()
    d = features[0].double().unsqueeze(1) - means.unsqueeze(0)
    expected = -torch.einsum("bkf,fg,bkg->bk", d, precision, d).min(1).values
    assert torch.allclose(score, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().mean()))
