"""HAT under torchrun with DistributedDataParallel: 2 processes, Gloo backend, on the CPU.

One ``torchrun --nproc_per_node=2`` launch (this file is also its worker script) trains HAT on 3
tiny tasks from scratch, then resumes a checkpoint written by a single process after task 0 and
trains tasks 1 and 2. The tests check what users rely on: every rank ends with bit-identical
parameters and buffers, earlier tasks keep their exact accuracy (BWT = 0.0), the reported accuracy
is that of a single-process evaluation of the same model, only rank 0 logs, and checkpoints cross
between a distributed run and a single process in both directions. The same launch then runs the
benchmark command (``python -m avalanche_hat.bench``'s ``main``) on the tiny digits benchmark.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avalanche_hat import HAT, HATConfig, trained_tasks
from cifar_fixtures import TinyHATNet, tensor_benchmark

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")

TORCHRUN = Path(sys.executable).with_name("torchrun")
NUM_TASKS = 3


def build_strategy(log_file=None, seed: int = 0, eval_only: bool = False, **kwargs) -> HAT:
    """The same HAT strategy in the workers and in this process: 4 samples per process and step.
    ``eval_only``: accuracy metrics that need no training first (no accuracy matrix)."""
    from avalanche.evaluation.metrics import accuracy_matrix_metrics, accuracy_metrics, bwt_metrics, loss_metrics
    from avalanche.logging import TextLogger
    from avalanche.training.plugins import EvaluationPlugin

    torch.manual_seed(seed)
    net = TinyHATNet(HATConfig(num_tasks=NUM_TASKS, mask_init="normal"))
    metrics = [accuracy_metrics(epoch=True, experience=True, stream=True)]
    if not eval_only:
        metrics += [loss_metrics(epoch=True), accuracy_matrix_metrics(), bwt_metrics(experience=True, stream=True)]
    evaluator = EvaluationPlugin(*metrics, loggers=[TextLogger(log_file)] if log_file is not None else [])
    return HAT(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), num_classes=2, train_mb_size=4,
               train_epochs=6, eval_mb_size=64, evaluator=evaluator, **kwargs)


def stacked_test_data(benchmark, task: int) -> torch.Tensor:
    data = benchmark.test_stream[task].dataset.eval()
    return torch.stack([data[i][0] for i in range(len(data))])


@torch.no_grad()
def task_logits(model, x: torch.Tensor, task: int) -> torch.Tensor:
    model.eval()
    return model(x, torch.full((len(x),), task))


def final_accuracies(results: dict) -> dict:
    """Accuracy per experience and on the whole stream, by metric name (keys may end in a task)."""
    return {k: v for k, v in results.items() if k.startswith(("Top1_Acc_Exp/eval_phase", "Top1_Acc_Stream/eval_phase"))}


def fingerprints(x: torch.Tensor) -> list[float]:
    """One number per sample (its float64 sum): which samples a minibatch holds."""
    return x.double().flatten(1).sum(1).tolist()


class SampleRecorder:
    """Records, per training epoch, the samples this rank's minibatches hold (before the forward)."""

    def __new__(cls):
        from avalanche.core import SupervisedPlugin

        class Recorder(SupervisedPlugin, supports_distributed=True):
            def __init__(self):
                super().__init__()
                self.epochs = []

            def before_training_epoch(self, strategy, **kwargs):
                self.epochs.append([])

            def before_forward(self, strategy, **kwargs):
                # fingerprints(), inline: checkpoints pickle this class by value (from torchrun's
                # __main__), and a process that loads one has no such global.
                self.epochs[-1] += strategy.mb_x.double().flatten(1).sum(1).tolist()

        return Recorder()


# ------------------------------------------------------------------------------ the worker
def worker(out: Path, single_checkpoint: Path) -> None:
    """Run by torchrun on every rank."""
    from avalanche_hat.training import init_distributed, destroy_distributed, get_rank, get_world_size
    from avalanche_hat.training.distributed import maybe_load_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    device = init_distributed()  # no GPU: Gloo on the CPU
    rank = get_rank()
    assert get_world_size() == 2 and device.type == "cpu" and torch.distributed.get_backend() == "gloo"
    benchmark = tensor_benchmark(NUM_TASKS)

    # From scratch, every rank starting from other weights: DDP must make them rank 0's.
    # (Avalanche refuses to create a logger on another rank.)
    recorder = SampleRecorder()
    with open(out / "log_scratch.txt", "w") as log:
        strategy = build_strategy(log if rank == 0 else None, seed=100 + rank, plugins=[recorder])
        for experience in benchmark.train_stream:
            strategy.train(experience)
            results = strategy.eval(benchmark.test_stream)
            if experience.current_experience == 0:
                save_checkpoint(strategy, out / "distributed_after_task0.ckpt")
    assert isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel)
    history = strategy.evaluator.get_all_metrics()
    torch.save({
        "state": strategy.model.module.state_dict(),
        "results": results,
        "train_metrics": {k: v for k, v in history.items() if k.startswith(("Loss_Epoch", "Top1_Acc_Epoch"))},
        "trained_tasks": strategy.trained_tasks,
        "samples_per_epoch": recorder.epochs,
    }, out / f"scratch_rank{rank}.pt")

    # Resumed from a single-process checkpoint taken after task 0. Its logger appends to the single
    # process's log file, on every rank that loads it: only rank 0's may write.
    strategy = build_strategy(seed=200 + rank)
    strategy, start = maybe_load_checkpoint(strategy, single_checkpoint)
    assert start == 1, start
    for experience in benchmark.train_stream[start:]:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream)
    torch.save({
        "state": strategy.model.module.state_dict(),
        "results": results,
        "trained_tasks": strategy.trained_tasks,
    }, out / f"resumed_rank{rank}.pt")

    # The benchmark command, as `torchrun ... -m avalanche_hat.bench` runs it (it leaves the group).
    from avalanche_hat.bench.cli import main

    code = main(["--benchmark", "digits", "--methods", "HAT", "Naive", "--epochs", "1", "--no-plots",
                 "--no-progress", "--out", str(out / "bench")])
    assert code == 0, code
    destroy_distributed()  # already done by the command: a no-op


# ------------------------------------------------------------------------------ the launch
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train task 0 in this process and checkpoint it, then launch the two ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from avalanche_hat.training.distributed import save_checkpoint

        out = tmp_path_factory.mktemp("distributed")
        benchmark = tensor_benchmark(NUM_TASKS)
        log = open(out / "log_single_then_resumed.txt", "w")
        single = build_strategy(log, seed=7)
        single.train(benchmark.train_stream[0])
        single_results = single.eval(benchmark.test_stream)
        save_checkpoint(single, out / "single_after_task0.ckpt")
        log.close()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", __file__,
                   "--out", str(out), "--single-checkpoint", str(out / "single_after_task0.ckpt")]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        (out / "torchrun_stdout.txt").write_text(done.stdout)
        ranks = {name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(2)]
                 for name in ("scratch", "resumed")}
        yield {"out": out, "benchmark": benchmark, "ranks": ranks, "single_results": single_results,
               "single_task0_logits": task_logits(single.model, stacked_test_data(benchmark, 0), 0)}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["scratch", "resumed"])
def test_all_ranks_end_with_bit_identical_parameters_and_buffers(run, name):
    first, second = (r["state"] for r in run["ranks"][name])
    assert first.keys() == second.keys()
    differing = [k for k in first if first[k].dtype != second[k].dtype
                 or not torch.equal(first[k].reshape(-1).view(torch.uint8), second[k].reshape(-1).view(torch.uint8))]
    assert differing == []
    # masks, protection flags, every task's norm statistics and heads included:
    assert any(k.endswith("mask_embedding") for k in first) and any(k.endswith("hat_trained") for k in first)
    assert any(k.endswith("copies.2.running_mean") for k in first) and any("head.copies.2" in k for k in first)


def test_each_epoch_the_ranks_split_the_experience_and_reshuffle_it(run):
    benchmark = run["benchmark"]
    per_task = [sorted(fingerprints(torch.stack([d[0] for d in e.dataset]))) for e in benchmark.train_stream]
    epochs = [r["samples_per_epoch"] for r in run["ranks"]["scratch"]]
    assert len(epochs[0]) == len(epochs[1]) == NUM_TASKS * 6  # 6 epochs per task
    for index, (first, second) in enumerate(zip(*epochs)):
        assert len(first) == len(second) == 16  # 32 samples, half each
        assert sorted(first + second) == per_task[index // 6]  # together: the task's data, once
    assert epochs[0][0] != epochs[0][1] and sorted(epochs[0][0]) != sorted(epochs[0][1])  # a new split


@pytest.mark.parametrize("name", ["scratch", "resumed"])
def test_earlier_tasks_keep_their_exact_accuracy(run, name):
    for rank in run["ranks"][name]:
        assert rank["trained_tasks"] == [0, 1, 2]
        results = rank["results"]
        matrix = results["EvalStream/Acc_Matrix"]
        assert all(matrix[t, t] >= 0.75 for t in range(NUM_TASKS)), matrix  # every task is learned
        for t in range(NUM_TASKS - 1):
            assert matrix[NUM_TASKS - 1, t].item() == matrix[t, t].item()
        assert results["StreamBWT/eval_phase/test_stream"] == 0.0


def test_every_rank_reports_the_same_numbers(run):
    first, second = (r["results"] for r in run["ranks"]["scratch"])
    assert torch.equal(first["EvalStream/Acc_Matrix"], second["EvalStream/Acc_Matrix"])
    assert final_accuracies(first) == final_accuracies(second)
    # Training metrics see every rank's minibatches: the per-epoch loss is the same on both ranks
    # (each rank's own shard would give other values).
    losses = [r["train_metrics"] for r in run["ranks"]["scratch"]]
    names = [k for k in losses[0] if k.startswith("Loss_Epoch")]
    assert names and all(losses[0][k][1] == losses[1][k][1] for k in names)


def test_reported_accuracy_equals_a_single_process_evaluation_of_the_final_model(run):
    rank0 = run["ranks"]["scratch"][0]
    strategy = build_strategy(eval_only=True)
    strategy.model.load_state_dict(rank0["state"])
    assert trained_tasks(strategy.model) == [0, 1, 2]
    single = strategy.eval(run["benchmark"].test_stream)
    reported = final_accuracies(rank0["results"])
    assert len(reported) == NUM_TASKS + 1
    assert final_accuracies(single) == reported  # exactly


def test_only_rank_zero_logs_even_with_loggers_loaded_from_a_checkpoint(run):
    """Both ranks load the single process's TextLogger (it reopens its file to append): one
    stream evaluation logged by the single process, then one after each of the 2 resumed tasks."""
    stream_lines = lambda name: [line for line in (run["out"] / name).read_text().splitlines()  # noqa: E731
                                 if line.strip().startswith("Top1_Acc_Stream/eval_phase/test_stream")]
    assert len(stream_lines("log_single_then_resumed.txt")) == 1 + 2
    assert len(stream_lines("log_scratch.txt")) == NUM_TASKS


def test_checkpoint_of_a_distributed_run_loads_and_trains_in_a_single_process(run):
    from avalanche_hat.training import DistributedHATPlugin
    from avalanche_hat.training.distributed import maybe_load_checkpoint

    benchmark = run["benchmark"]
    strategy, start = maybe_load_checkpoint(build_strategy(seed=3), run["out"] / "distributed_after_task0.ckpt")
    assert start == 1 and strategy.trained_tasks == [0]
    assert not isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel)
    assert any(isinstance(p, DistributedHATPlugin) for p in strategy.plugins)  # inert here
    # Task 0 answers exactly as at the end of the distributed run (HAT kept it bit-identical there).
    x0 = stacked_test_data(benchmark, 0)
    final = build_strategy()
    final.model.load_state_dict(run["ranks"]["scratch"][0]["state"])
    after_task0 = task_logits(strategy.model, x0, 0)
    assert torch.equal(after_task0, task_logits(final.model, x0, 0))
    strategy.train(benchmark.train_stream[1])
    assert strategy.trained_tasks == [0, 1]
    assert torch.equal(task_logits(strategy.model, x0, 0), after_task0)


def test_checkpoint_of_a_single_process_resumes_in_the_distributed_run(run):
    """The ranks resumed from the single process's task 0: it answers as it did there."""
    x0 = stacked_test_data(run["benchmark"], 0)
    resumed = build_strategy()
    resumed.model.load_state_dict(run["ranks"]["resumed"][0]["state"])
    assert torch.equal(task_logits(resumed.model, x0, 0), run["single_task0_logits"])
    single_acc = run["single_results"]["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"]
    assert single_acc >= 0.75
    assert run["ranks"]["resumed"][0]["results"]["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"] == single_acc


def test_benchmark_command_under_torchrun_trains_hat_with_ddp_and_reports_once(run):
    import json

    stdout = (run["out"] / "torchrun_stdout.txt").read_text()
    assert stdout.count("HAT seed 0: ACC") == stdout.count("total wall time") == 1  # rank 0 alone prints
    record = json.loads((run["out"] / "bench" / "digits.json").read_text())
    hat = [r for r in record["runs"] if r["method"] == "HAT"]
    assert len(hat) == 1 and hat[0]["bwt"] == 0.0 and hat[0]["acc"] > 0.5
    assert record["config"]["distributed"]["processes"] == 2
    assert record["config"]["distributed"]["global_batch_size"] == 2 * record["config"]["settings"]["batch_size"]
    assert "DistributedDataParallel" in record["config"]["skipped"]["Naive"]


# ------------------------------------------------------------------- single-process behaviour
def test_without_a_process_group_the_plugin_is_inert_and_distributed_true_says_what_to_do():
    from avalanche_hat.training import DistributedHATPlugin

    strategy = build_strategy()
    assert isinstance(strategy.distributed_plugin, DistributedHATPlugin)
    assert strategy.plugins.index(strategy.distributed_plugin) == strategy.plugins.index(strategy.hat_plugin) + 1
    assert build_strategy(distributed=False).distributed_plugin is None
    with pytest.raises(TypeError, match="DistributedHATPlugin"):
        build_strategy(distributed="yes")
    required = build_strategy(distributed=True)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node=N"):
        required.train(tensor_benchmark(NUM_TASKS).train_stream[0])


def test_init_distributed_outside_torchrun_says_how_to_launch(monkeypatch):
    from avalanche_hat.training import init_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node=N"):
        init_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="worker of test_distributed.py (started by torchrun)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--single-checkpoint", type=Path, required=True)
    args = parser.parse_args()
    worker(args.out, args.single_checkpoint)
