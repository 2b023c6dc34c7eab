"""A checkpointed run, interrupted and resumed: the same result as a run that never stopped.

HAT learns five task-incremental tasks of scikit-learn's digits (0/1, 2/3, ..., 8/9) with
``save_checkpoint`` after every experience. The first run stops after experience 1, as if the
machine went down. A brand-new strategy, built by the same code a restarted process would run,
calls ``maybe_load_checkpoint``: it gets back the model, the optimizer, the metrics and the random
state, and the number of the next experience (2), and trains the rest. The script checks, and
prints, that

- the resumed run starts at experience 2 and its model knows tasks 0 and 1 as trained,
- it ends with the same accuracy matrix and bit-identical parameters as an uninterrupted run,
- BWT is exactly 0.0 in both.

Run: ``python examples/checkpoint_resume.py`` (``AVALANCHE_HAT_EXAMPLES_FAST=1``: fewer epochs).
"""
import os
import tempfile
import warnings

import timm
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import accuracy_matrix_metrics, accuracy_metrics, bwt_metrics
from avalanche.training.plugins import EvaluationPlugin
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

import avalanche_hat.timm_models  # noqa: F401  (registers hat_mlp)
from avalanche_hat import HAT, HATConfig, trained_tasks
from avalanche_hat.training import maybe_load_checkpoint, save_checkpoint

FAST = os.environ.get("AVALANCHE_HAT_EXAMPLES_FAST") == "1"
EPOCHS = 6 if FAST else 20
NUM_TASKS = 5


def digits_benchmark():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = len(y) * 3 // 4
    train, test = TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])
    train.targets, test.targets = y[:cut].tolist(), y[cut:].tolist()
    return nc_benchmark(train, test, n_experiences=NUM_TASKS, task_labels=True, seed=0,
                        fixed_class_order=list(range(10)), class_ids_from_zero_in_each_exp=True)


def build_strategy():
    """What a (re)started process builds before looking for a checkpoint."""
    torch.manual_seed(0)
    net = timm.create_model("hat_mlp", hat_config=HATConfig(num_tasks=NUM_TASKS), num_classes=0,
                            in_chans=1, img_size=8, hidden_sizes=(200, 200))
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), accuracy_matrix_metrics(),
                                 bwt_metrics(stream=True), loggers=[])
    return HAT(model=net, num_classes=2, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
               train_mb_size=32, train_epochs=EPOCHS, eval_mb_size=500, evaluator=evaluator)


def run(benchmark, checkpoint=None, stop_after=None):
    """Train from the checkpoint's next experience (or 0) to the end, or up to ``stop_after``."""
    strategy, start = build_strategy(), 0
    if checkpoint is not None:
        strategy, start = maybe_load_checkpoint(strategy, checkpoint)
    results = None
    for experience in benchmark.train_stream[start:]:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream)
        if checkpoint is not None:
            save_checkpoint(strategy, checkpoint)
        if experience.current_experience == stop_after:
            break
    return strategy, start, results


def main():
    warnings.filterwarnings("ignore", message="No loggers specified")
    torch.set_num_threads(1)
    benchmark = digits_benchmark()
    uninterrupted, _, expected = run(benchmark)

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "hat.ckpt")
        run(benchmark, checkpoint, stop_after=1)  # "the machine goes down" after experience 1
        print(f"interrupted after experience 1; checkpoint {os.path.getsize(checkpoint) / 1e6:.1f} MB")
        resumed, start, results = run(benchmark, checkpoint)

    print(f"resumed at experience {start}")
    assert start == 2, start
    matrix, reference = results["EvalStream/Acc_Matrix"], expected["EvalStream/Acc_Matrix"]
    print("accuracy matrix of the resumed run:\n", matrix)
    assert trained_tasks(resumed.model) == list(range(NUM_TASKS))
    assert torch.equal(matrix, reference), f"resumed {matrix.tolist()} != uninterrupted {reference.tolist()}"
    same = all(torch.equal(a, b) for a, b in zip(resumed.model.state_dict().values(),
                                                uninterrupted.model.state_dict().values()))
    print(f"parameters and buffers bit-identical to the uninterrupted run: {same}")
    assert same, "the resumed run's parameters differ from the uninterrupted run's"
    for r in (results, expected):
        assert r["StreamBWT/eval_phase/test_stream"] == 0.0, r["StreamBWT/eval_phase/test_stream"]
    assert matrix.diagonal().min() >= 0.9, f"a task was not learned: {matrix.tolist()}"
    print("OK: the resumed run ends exactly where the uninterrupted one does, with BWT = 0.0")


if __name__ == "__main__":
    main()
