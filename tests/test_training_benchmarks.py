"""HAT end to end on Avalanche's real benchmark classes: zero forgetting, exactly.

SplitCIFAR10 / SplitCIFAR100 read a tiny dataset written in torchvision's exact on-disk format (no
download here); Split Fashion-MNIST reads a class-balanced subsample of the real data. After the last
experience, the accuracy on every earlier experience equals, exactly, the accuracy measured right
after learning it (BWT = 0.0, not approximately). Checkpoint resume runs its two halves in fresh
processes and must give the same accuracy matrix as an uninterrupted run.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from avalanche.benchmarks.classic import SplitCIFAR100, SplitFMNIST

from avalanche_hat import HAT, HATConfig, HATMultiTaskModel

from cifar_fixtures import (
    TinyHATNet, exact_eval_metrics, fashion_mnist_available, patch_cifar_checksums, run_split_cifar10,
    tensor_benchmark, write_cifar10, write_cifar100, write_fashion_mnist,
)

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]
TESTS = os.path.dirname(os.path.abspath(__file__))



@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar"))
    write_cifar10(root)
    write_cifar100(root, train_per_class=8, test_per_class=2)
    return root


def run_stream(strategy, benchmark):
    """Train on each experience in turn, evaluating the whole test stream after each one."""
    for experience in benchmark.train_stream:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream)
    return results


def assert_zero_forgetting(results, learned_at_least):
    matrix = results["EvalStream/Acc_Matrix"]
    last = len(matrix) - 1
    for t in range(len(matrix)):
        assert matrix[t, t].item() >= learned_at_least, f"task {t} was not learned: {matrix.tolist()}"
        assert matrix[last, t].item() == matrix[t, t].item(), f"task {t} changed: {matrix.tolist()}"
    assert results["StreamBWT/eval_phase/test_stream"] == 0.0


def test_split_cifar10_task_incremental_zero_forgetting(cifar_root, monkeypatch):
    patch_cifar_checksums(cifar_root, monkeypatch)
    matrix = torch.tensor(run_split_cifar10(cifar_root)["matrix"])
    for t in range(5):
        assert matrix[t, t] >= 0.9, matrix
        assert matrix[4, t].item() == matrix[t, t].item(), matrix  # exactly
    # BWT from the matrix Avalanche recorded: the mean change of earlier experiences, exactly 0.
    assert (matrix[4, :4] - matrix.diagonal()[:4]).abs().sum().item() == 0.0


def test_split_cifar100_task_incremental_zero_forgetting(cifar_root, monkeypatch):
    """Original class ids (0..99) and one 100-way head per task; Adam, whose moments HAT resets."""
    patch_cifar_checksums(cifar_root, monkeypatch)
    benchmark = SplitCIFAR100(5, return_task_id=True, seed=0, dataset_root=cifar_root)
    torch.manual_seed(0)
    net = TinyHATNet(HATConfig(num_tasks=5))
    strategy = HAT(model=net, optimizer=torch.optim.Adam(net.parameters(), lr=1e-2), num_classes=100,
                   train_mb_size=20, train_epochs=5, eval_mb_size=100, evaluator=exact_eval_metrics())
    results = run_stream(strategy, benchmark)
    # 20 classes per task (chance 0.05), 8 images each: every task well above chance, most far above.
    assert_zero_forgetting(results, learned_at_least=0.25)
    assert results["EvalStream/Acc_Matrix"].diagonal().mean() >= 0.5


@pytest.mark.skipif(not fashion_mnist_available(), reason="needs the Debian package dataset-fashion-mnist")
def test_split_fashion_mnist_real_data_zero_forgetting(tmp_path):
    """200 real training images per class. Class order seed 1 pairs classes a small network can tell
    apart in 4 epochs (seed 0 puts pullover and shirt in one task); the exactness holds for any order."""
    root = write_fashion_mnist(str(tmp_path), train_per_class=200, test_per_class=50)
    benchmark = SplitFMNIST(5, return_task_id=True, seed=1, class_ids_from_zero_in_each_exp=True, dataset_root=root)
    torch.manual_seed(0)
    net = TinyHATNet(HATConfig(num_tasks=5), in_channels=1)
    strategy = HAT(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), num_classes=2,
                   train_mb_size=32, train_epochs=4, eval_mb_size=250, evaluator=exact_eval_metrics())
    results = run_stream(strategy, benchmark)
    assert_zero_forgetting(results, learned_at_least=0.75)


RESUME = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore")
    sys.path.insert(0, {tests!r})
    from cifar_fixtures import patch_cifar_checksums, run_split_cifar10
    root, checkpoint, stop_after, out = sys.argv[1:]
    patch_cifar_checksums(root)
    run = run_split_cifar10(root, checkpoint, stop_after=None if stop_after == "-" else int(stop_after))
    with open(out, "w") as f:
        json.dump(run, f)
""")


def test_checkpoint_resume_in_a_new_process_gives_the_same_accuracy_matrix(cifar_root, monkeypatch, tmp_path):
    """First process: experiences 0-1, a checkpoint after each (Avalanche's save_checkpoint).
    Second process: maybe_load_checkpoint, then experiences 2-4. Same matrix as one uninterrupted run."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME.format(tests=TESTS))
    checkpoint = str(tmp_path / "hat_checkpoint.pkl")
    run = lambda stop, out: subprocess.run(  # noqa: E731
        [sys.executable, str(script), cifar_root, checkpoint, stop, str(tmp_path / out)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    run("1", "first.json")
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["matrix"][1][1] > 0 and not any(any(row) for row in first["matrix"][2:])  # stopped after exp. 1
    run("-", "resumed.json")
    resumed = json.loads((tmp_path / "resumed.json").read_text())

    patch_cifar_checksums(cifar_root, monkeypatch)
    uninterrupted = run_split_cifar10(cifar_root)
    assert resumed["matrix"] == uninterrupted["matrix"]
    assert torch.tensor(resumed["matrix"]).diagonal().min() >= 0.9
    # The weights too, exactly: the same data order and the same updates after the restart.
    assert resumed["fingerprint"] == uninterrupted["fingerprint"]
    assert first["fingerprint"] != uninterrupted["fingerprint"]


def test_a_timm_hat_network_becomes_a_multi_head_model_in_one_line():
    timm = pytest.importorskip("timm")
    try:
        import avalanche_hat.timm_models  # noqa: F401
    except ImportError:
        pytest.skip("avalanche_hat.timm_models is not available")
    benchmark = tensor_benchmark(2, size=16)
    torch.manual_seed(0)
    net = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=2), num_classes=0)
    strategy = HAT(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), num_classes=2,
                   train_mb_size=16, train_epochs=2, eval_mb_size=64, evaluator=exact_eval_metrics())
    assert isinstance(strategy.model, HATMultiTaskModel) and strategy.model.backbone is net
    data = benchmark.test_stream[0].dataset.eval()
    x0 = torch.stack([data[i][0] for i in range(len(data))])
    strategy.train(benchmark.train_stream[0])
    strategy.model.eval()
    with torch.no_grad():
        task0 = strategy.model(x0, 0)
    strategy.train(benchmark.train_stream[1])
    results = strategy.eval(benchmark.test_stream)
    strategy.model.eval()
    with torch.no_grad():
        assert torch.equal(strategy.model(x0, 0), task0)
    assert results["StreamBWT/eval_phase/test_stream"] == 0.0

    # A timm network that already ends in per-task heads is used as it is.
    with_heads = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=2), num_classes=3)
    model = HATMultiTaskModel(with_heads)
    assert model.head is None and model.num_classes == 3
    model.eval()
    with torch.no_grad():
        mixed = model(x0[:4], torch.tensor([0, 1, 0, 1]))
        assert mixed.shape == (4, 3)
        assert torch.equal(mixed[1::2], model(x0[1:4:2], 1))
