"""Mistakes a newcomer makes on inputs the other suites do not cover: each gets a clear error that
says what to do (not an exception from deep inside torch), before anything learned changes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from avalanche_hat import HAT, HATConfig, capacity_report, convert, mark_task_trained

from cifar_fixtures import TinyHATNet, exact_eval_metrics, tensor_benchmark

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]


def _hat(num_classes=2, num_tasks=2):
    torch.manual_seed(0)
    net = TinyHATNet(HATConfig(num_tasks=num_tasks, mask_init="normal"))
    return HAT(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), num_classes=num_classes,
               train_mb_size=8, train_epochs=1, evaluator=exact_eval_metrics())


def _global_class_ids_benchmark():
    """Task labels, but class ids 0..3 over the stream (not restarting at 0 in each task)."""
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(8)
    data = TensorDataset(torch.randn(len(y), 3, 8, 8, generator=g), y)
    data.targets = y.tolist()
    return nc_benchmark(data, data, n_experiences=2, task_labels=True, seed=0,
                        class_ids_from_zero_in_each_exp=False)


def test_class_ids_beyond_the_per_task_heads_are_refused_with_what_to_do():
    benchmark = _global_class_ids_benchmark()
    strategy = _hat(num_classes=2)
    before = copy.deepcopy(strategy.model.state_dict())
    experience = next(e for e in benchmark.train_stream if max(e.classes_in_this_experience) >= 2)
    with pytest.raises(ValueError, match=r"outputs per task") as error:
        strategy.train(experience)
    message = str(error.value)
    assert "class_ids_from_zero_in_each_exp=True" in message and "num_classes=4" in message
    after = strategy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before any step


def test_heads_wide_enough_for_global_class_ids_train_and_evaluate():
    benchmark = _global_class_ids_benchmark()
    strategy = _hat(num_classes=4)
    for experience in benchmark.train_stream:
        strategy.train(experience)
    results = strategy.eval(benchmark.test_stream)
    assert strategy.trained_tasks == [0, 1]
    assert 0.0 <= results["Top1_Acc_Stream/eval_phase/test_stream/Task001"] <= 1.0


def test_evaluating_on_class_ids_beyond_the_heads_is_refused_too():
    strategy = _hat(num_classes=2)
    strategy.train(tensor_benchmark(2).train_stream[0])
    experience = next(e for e in _global_class_ids_benchmark().test_stream
                      if max(e.classes_in_this_experience) >= 2)
    with pytest.raises(ValueError, match=r"class labels 2\.\.3, but the model gives 2 outputs per task"):
        strategy.eval([experience])


def _small_converted():
    torch.manual_seed(0)
    return convert(nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), HATConfig(num_tasks=2))


def test_capacity_report_before_any_task_is_a_well_formed_table():
    lines = capacity_report(_small_converted()).to_markdown().splitlines()
    columns = [line.count("|") for line in lines]
    assert lines[0] == "| layer | units | owned | shared |"
    assert len(set(columns)) == 1, f"rows with different column counts: {lines}"


def test_capacity_report_refuses_task_ids_the_network_does_not_have():
    net = _small_converted()
    mark_task_trained(net, 0)
    with pytest.raises(ValueError, match="out of range for HATConfig"):
        capacity_report(net, tasks=[-1])  # would have reported task 1's masks under "task -1"
    with pytest.raises(ValueError, match="out of range for HATConfig"):
        capacity_report(net, tasks=[5])
    with pytest.raises(TypeError, match="task ids"):
        capacity_report(net, tasks=[None])
    with pytest.raises(KeyError, match=r"capacity_report\(model, tasks="):
        capacity_report(net).usage(1)
    assert capacity_report(net, tasks=[0, 1]).usage(1) == 1.0  # dense start: every unit on


def test_a_numpy_task_id_is_refused_with_what_to_do():
    np = pytest.importorskip("numpy")
    net = _small_converted().eval()
    with pytest.raises(TypeError, match=r"got int64: pass int\(task_id\)"):
        net(torch.randn(2, 12), task_id=np.int64(0))


class _LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.lstm, self.head = nn.Embedding(50, 8), nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

    def forward(self, tokens):
        hidden, _ = self.lstm(self.embedding(tokens))
        return self.head(hidden[:, -1])


def test_a_model_with_no_layer_to_mask_besides_its_classifier_is_refused_with_what_to_do():
    from avalanche_hat import ConversionError

    with pytest.raises(ConversionError) as error:
        convert(_LSTMClassifier(), HATConfig(num_tasks=2))
    message = str(error.value)
    assert "besides its classifier (head)" in message  # it has a linear layer: the classifier
    assert "lstm (LSTM)" in message and "embedding (Embedding)" in message
    assert "give the model at least one such layer" in message


def test_a_convolutional_classifier_is_refused_with_what_to_do():
    from avalanche_hat import ConversionError

    torchvision = pytest.importorskip("torchvision")
    squeezenet = torchvision.models.squeezenet1_1(num_classes=3)  # its classifier is a 1x1 Conv2d
    with pytest.raises(ConversionError, match="global pooling, flatten and nn.Linear"):
        convert(squeezenet, HATConfig(num_tasks=2), heads=3)
    with pytest.raises(ConversionError, match=r"global pooling and flatten .* or pass heads=\(\)"):
        convert(squeezenet, HATConfig(num_tasks=2), heads="classifier.1")


# --------------------------------------------------------------- timm models made with num_classes=0
def test_a_timm_feature_model_gets_no_head_taken_from_inside_it():
    """vit(num_classes=0) has no classifier: the last MLP layer of its last block is not one."""
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                            depth=2)
    net = convert(vit, HATConfig(num_tasks=2)).eval()
    assert net.hat_report.heads == []
    assert "blocks.1.mlp.fc2" in net.hat_report.hat_layers
    assert net.num_features == 192
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32), task_id=0).shape == (2, 192)


def test_heads_int_on_a_timm_feature_model_is_refused_with_what_to_do():
    from avalanche_hat import ConversionError

    timm = pytest.importorskip("timm")
    with pytest.raises(ConversionError, match=r"returns features .* heads=\(\)"):
        convert(timm.create_model("resnet10t", pretrained=False, num_classes=0), HATConfig(num_tasks=2), heads=2)


def test_hat_strategy_adds_per_task_heads_on_a_timm_feature_model_as_documented():
    """docs/how-to/your-own-model.md: HAT(model=timm.create_model(..., num_classes=0), hat_config=...,
    num_classes=2) adds a per-task head on the features."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    strategy = HAT(model=model, hat_config=HATConfig(num_tasks=2, mask_init="normal"), num_classes=2,
                   optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8, train_epochs=1,
                   evaluator=exact_eval_metrics())
    benchmark = tensor_benchmark(2, size=32)
    x = torch.stack([benchmark.test_stream[0].dataset[i][0] for i in range(8)])
    strategy.train(benchmark.train_stream[0])
    with torch.no_grad():
        before = strategy.model.eval()(x, torch.zeros(len(x), dtype=torch.long))
    strategy.train(benchmark.train_stream[1])
    with torch.no_grad():
        after = strategy.model.eval()(x, torch.zeros(len(x), dtype=torch.long))
    assert before.shape == (8, 2)
    assert torch.equal(before, after)
    assert strategy.trained_tasks == [0, 1]
