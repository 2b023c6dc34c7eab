"""Class-incremental HAT on real Split Fashion-MNIST (a class-balanced subset, so that it runs in
seconds): the stream carries task label 0 everywhere, and HAT must still beat fine-tuning.

The full-size measurement is the leaderboard's class-incremental mode
(``avalanche-hat-bench --scenario class``)."""
import math

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.training import Naive
from torch import nn
from torch.utils.data import DataLoader

from avalanche_hat import HAT, HATConfig
from avalanche_hat.bench.data import DataNotFound, PreloadedImages, load_fmnist, stratified_subset
from avalanche_hat.bench.networks import HATMLP, PlainMLP
from avalanche_hat.training import HATClassIncrementalModel, evaluate_task_inference
from avalanche_hat.training.class_incremental import NEGATIVE_TRANSFORMS

from cifar_fixtures import exact_eval_metrics

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")
TRAIN_PER_CLASS, TEST_PER_CLASS, WIDTH, EPOCHS = 300, 100, 128, 3


@pytest.fixture(scope="module")
def split_fmnist():
    try:
        (train_x, train_y), (test_x, test_y), _ = load_fmnist()
    except DataNotFound:
        pytest.skip("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")
    train = stratified_subset(train_y, TRAIN_PER_CLASS / 6000, seed=0)
    test = stratified_subset(test_y, TEST_PER_CLASS / 1000, seed=0)
    return nc_benchmark(PreloadedImages(train_x[train], train_y[train]), PreloadedImages(test_x[test], test_y[test]),
                        n_experiences=5, task_labels=False, fixed_class_order=list(range(10)))


def run(strategy, benchmark):
    for experience in benchmark.train_stream:
        strategy.train(experience)
    return strategy.eval(benchmark.test_stream)


@pytest.fixture(scope="module")
def hat_and_naive(split_fmnist):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = HATClassIncrementalModel(HATMLP(1, 28, HATConfig(num_tasks=5), width=WIDTH), num_classes=10,
                                         classes_per_task=2)
        hat = HAT(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=32,
                  train_epochs=EPOCHS, eval_mb_size=500, evaluator=exact_eval_metrics())
        hat_results = run(hat, split_fmnist)
        torch.manual_seed(0)
        plain = nn.Sequential(PlainMLP(1, 28, width=WIDTH), nn.Linear(WIDTH, 10))
        naive = Naive(model=plain, optimizer=torch.optim.SGD(plain.parameters(), lr=0.05), train_mb_size=32,
                      train_epochs=EPOCHS, eval_mb_size=500, evaluator=exact_eval_metrics())
        naive_results = run(naive, split_fmnist)
    finally:
        torch.set_num_threads(threads)
    return model, hat_results, naive_results


def test_hat_without_task_labels_beats_fine_tuning_and_keeps_its_first_task(hat_and_naive):
    _, hat, naive = hat_and_naive
    key = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
    assert hat[key] > naive[key] + 0.3, (hat[key], naive[key])
    first_task_hat, first_task_naive = hat["EvalStream/Acc_Matrix"][-1][0], naive["EvalStream/Acc_Matrix"][-1][0]
    assert first_task_naive < 0.1 < 0.5 < first_task_hat


def test_the_task_is_predicted_far_above_chance(hat_and_naive, split_fmnist):
    model, _, _ = hat_and_naive
    test = torch.utils.data.ConcatDataset([e.dataset.eval() for e in split_fmnist.test_stream])
    report = evaluate_task_inference(model, DataLoader(test, batch_size=500))
    assert report["samples"] == 10 * TEST_PER_CLASS and report["unknown"] == 0
    assert report["task_accuracy"]["mahalanobis"]["calibrated"] > 0.6  # chance: 0.2


def test_the_reject_logit_flags_rotated_images_of_its_own_task(hat_and_naive, split_fmnist):
    model, _, _ = hat_and_naive
    model.eval()
    for e in split_fmnist.test_stream:
        x = torch.stack([e.dataset[i][0] for i in range(len(e.dataset))])
        task = e.current_experience
        with torch.no_grad():
            upright = model.task_outputs(x, task)[1].softmax(1)[:, -1].mean()
            rotated = model.task_outputs(NEGATIVE_TRANSFORMS["rot90"](x), task)[1].softmax(1)[:, -1].mean()
        assert rotated > 0.5 > upright, (task, float(rotated), float(upright))
        assert math.isfinite(float(upright))
