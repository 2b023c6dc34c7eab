"""HAT data-parallel under torchrun: two processes on the CPU (Gloo), every one ends bit-identical.

``torchrun --standalone --nproc_per_node=2 examples/torchrun_cpu.py`` starts two processes;
``init_distributed()`` joins them (Gloo and the CPU here, NCCL and ``cuda:LOCAL_RANK`` with GPUs)
and ``HAT`` wraps the model in ``DistributedDataParallel`` when training starts. Each process
trains on its own shard of every experience (five task-incremental tasks of scikit-learn's
digits). Run without torchrun, the script launches itself with two processes. It checks, and rank
0 prints, that

- after every experience both processes hold bit-identical parameters and buffers,
- every earlier task keeps its exact accuracy: the accuracy matrix's last row is its diagonal, BWT 0.0,
- both processes report the same accuracies (each evaluates the whole test stream).

``AVALANCHE_HAT_EXAMPLES_FAST=1``: fewer epochs.
"""
# example-launch: torchrun --standalone --nproc_per_node=2
import os
import subprocess
import sys
import warnings

import timm
import torch
import torch.distributed as dist
from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import accuracy_matrix_metrics, accuracy_metrics, bwt_metrics
from avalanche.training.plugins import EvaluationPlugin
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

import avalanche_hat.timm_models  # noqa: F401  (registers hat_mlp)
from avalanche_hat import HAT, HATConfig
from avalanche_hat.training import destroy_distributed, get_rank, get_world_size, init_distributed, is_main_process

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


def identical_on_every_rank(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def main():
    warnings.filterwarnings("ignore", message="No loggers specified")
    torch.set_num_threads(1)
    device = init_distributed()  # no GPU: Gloo on the CPU
    say = print if is_main_process() else (lambda *a, **k: None)
    say(f"{get_world_size()} processes, backend {dist.get_backend()}, device {device}")
    benchmark = digits_benchmark()
    torch.manual_seed(0)
    net = timm.create_model("hat_mlp", hat_config=HATConfig(num_tasks=NUM_TASKS), num_classes=0,
                            in_chans=1, img_size=8, hidden_sizes=(200, 200))
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), accuracy_matrix_metrics(),
                                 bwt_metrics(stream=True), loggers=[])
    # 16 samples per process and step: a global minibatch of 32.
    strategy = HAT(model=net, num_classes=2, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
                   train_mb_size=16, train_epochs=EPOCHS, eval_mb_size=500, evaluator=evaluator, device=device)
    for experience in benchmark.train_stream:
        strategy.train(experience)  # each process: its shard
        results = strategy.eval(benchmark.test_stream)
        model = strategy.model.module if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel) \
            else strategy.model
        state = torch.cat([v.detach().double().flatten() for v in model.state_dict().values()])
        same = identical_on_every_rank(state)
        say(f"after experience {experience.current_experience}: parameters and buffers bit-identical "
            f"on all {get_world_size()} processes: {same}")
        assert same, f"rank {get_rank()} holds other parameters than rank 0"

    assert isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel)
    matrix = results["EvalStream/Acc_Matrix"]
    say("accuracy matrix:\n", matrix)
    assert identical_on_every_rank(matrix.double().flatten()), "the processes report different accuracies"
    for t in range(NUM_TASKS):
        assert matrix[t, t] >= 0.9, f"task {t} was not learned: {matrix.tolist()}"
        assert matrix[-1, t].item() == matrix[t, t].item(), f"task {t} changed: {matrix.tolist()}"
    assert results["StreamBWT/eval_phase/test_stream"] == 0.0
    say("OK: both processes end bit-identical and every earlier task kept its exact accuracy (BWT = 0.0)")
    destroy_distributed()


if __name__ == "__main__":
    if "LOCAL_RANK" not in os.environ:  # not started by torchrun: start two processes of this script
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
        print("launching:", " ".join(command), flush=True)
        sys.exit(subprocess.call(command))
    main()
