"""Class-incremental HAT: no task ids at test time; the model predicts the task itself.

scikit-learn's digits as an Avalanche class-incremental stream (``nc_benchmark``,
``task_labels=False``: every experience carries task label 0) of five experiences of two classes.
``HATClassIncrementalModel`` makes experience ``i`` HAT task ``i``; at evaluation every trained
task's network runs in one batched pass, each task scores the input (Mahalanobis distance on its
features by default, calibrated across tasks) and the output is log-probabilities over all classes
seen so far, so Avalanche's accuracy metrics work unchanged. The script checks, and prints, that

- each task's own network is untouched by later tasks: ``forward_task(x, t)`` bit-identical,
- with task ids given, every task is learned (task-incremental accuracy of the same model),
- without task ids, the accuracy over all 10 classes is far above chance (10%),

and prints the task-prediction accuracy of every score (``evaluate_task_inference``).

Run: ``python examples/class_incremental.py`` (``AVALANCHE_HAT_EXAMPLES_FAST=1``: fewer epochs).
"""
import os
import warnings

import timm
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import avalanche_hat.timm_models  # noqa: F401  (registers hat_mlp)
from avalanche_hat import HAT, HATConfig
from avalanche_hat.training import HATClassIncrementalModel, evaluate_task_inference

FAST = os.environ.get("AVALANCHE_HAT_EXAMPLES_FAST") == "1"
EPOCHS = 6 if FAST else 20
NUM_TASKS = 5


def digits_datasets():
    """Train / test TensorDatasets of 1x8x8 images (pixel values / 16), 25% of each class for test."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    cut = len(y) * 3 // 4
    train, test = TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])
    train.targets, test.targets = y[:cut].tolist(), y[cut:].tolist()
    return train, test


def stacked(experience):
    data = experience.dataset.eval()
    return torch.stack([data[i][0] for i in range(len(data))]), torch.tensor([data[i][1] for i in range(len(data))])


def main():
    warnings.filterwarnings("ignore", message="No loggers specified")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train, test = digits_datasets()
    benchmark = nc_benchmark(train, test, n_experiences=NUM_TASKS, task_labels=False, seed=0,
                             fixed_class_order=list(range(10)))
    net = timm.create_model("hat_mlp", hat_config=HATConfig(num_tasks=NUM_TASKS), num_classes=0,
                            in_chans=1, img_size=8, hidden_sizes=(200, 200))
    model = HATClassIncrementalModel(net, num_classes=10, classes_per_task=2)
    strategy = HAT(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                   train_mb_size=32, train_epochs=EPOCHS, eval_mb_size=500,
                   evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]))

    tests = [stacked(e) for e in benchmark.test_stream]
    task_outputs = []
    for experience in benchmark.train_stream:
        t = experience.current_experience
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream)
        model.eval()
        with torch.no_grad():
            task_outputs.append(model.forward_task(tests[t][0], t))
        print(f"after experience {t} (classes {experience.classes_in_this_experience}): accuracy over the "
              f"whole test stream, no task ids: {results['Top1_Acc_Stream/eval_phase/test_stream/Task000']:.4f}")

    model.eval()
    with torch.no_grad():
        for t, (x, y) in enumerate(tests):
            assert torch.equal(model.forward_task(x, t), task_outputs[t]), f"task {t}'s network changed"
            # Task-incremental accuracy of the same model: task t's head (logits at its own classes).
            hits = (model.forward_task(x, t).argmax(1) == y).float().mean().item()
            print(f"task {t}: network bit-identical since it was learned; accuracy with its task id {hits:.4f}")
            assert hits >= 0.9, f"task {t} was not learned ({hits:.4f})"
    accuracy = results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    inference = evaluate_task_inference(model, DataLoader(test, batch_size=500))
    for score, acc in inference["task_accuracy"].items():
        print(f"task prediction with the {score} score: {acc['calibrated']:.4f} calibrated, {acc['raw']:.4f} raw")
    print(f"class-incremental accuracy over 10 classes: {accuracy:.4f} (chance 0.1)")
    assert accuracy >= 0.5, f"class-incremental accuracy {accuracy:.4f} is too close to chance"
    print("OK: every task's network is bit-identical and HAT predicts the task without task ids")


if __name__ == "__main__":
    main()
