"""How class-incremental HAT's own settings were chosen: one run on a 10% holdout of Split
Fashion-MNIST's training data (never the test set), every task score and temperature evaluated on
the same trained model.

Usage:  python benchmarks/class_incremental_holdout.py [--seed 0] [--no-reject-head]
        [--shrinkage 0.01] [--reg-coef 0.75] [--temperatures 0 0.5 1 2]

Same data split, network (the leaderboard's MLP), budget (3 epochs, batch 64, SGD lr 0.01 with
momentum 0.9, optimizer state reset per task) and holdout as ``avalanche-hat-bench --scenario class
--tune``. Prints one JSON line: for each temperature, every score's task-id accuracy and
class-incremental accuracy (calibrated and raw), in %.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from torch.utils.data import DataLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reject-head", dest="reject_head", action="store_false")
    parser.add_argument("--shrinkage", type=float, default=None, help="covariance shrinkage (default: the model's)")
    parser.add_argument("--reg-coef", type=float, default=0.75)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from avalanche_hat import HAT, HATConfig
    from avalanche_hat.bench.data import make_benchmark
    from avalanche_hat.bench.networks import build_trunk
    from avalanche_hat.bench.strategies import ResetOptimizerState
    from avalanche_hat.training import HATClassIncrementalModel, evaluate_task_inference

    spec = make_benchmark("fmnist", holdout=0.1, scenario="class")
    torch.manual_seed(args.seed)
    cfg = HATConfig(num_tasks=spec.num_tasks)
    net = build_trunk("mlp", in_chans=spec.in_chans, img_size=spec.img_size, hat_config=cfg)
    extra = {} if args.shrinkage is None else {"covariance_shrinkage": args.shrinkage}
    model = HATClassIncrementalModel(net, num_classes=10, classes_per_task=2, reject_head=args.reject_head,
                                     feature_statistics=True, **extra)
    strategy = HAT(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                   reg_coef=args.reg_coef, train_mb_size=64, train_epochs=args.epochs, eval_mb_size=1000,
                   plugins=[ResetOptimizerState()],
                   evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]))
    start = time.perf_counter()
    for experience in spec.scenario.train_stream:
        strategy.train(experience)
    out = {"args": vars(args), "train_seconds": round(time.perf_counter() - start, 1),
           "covariance_shrinkage": model.covariance_shrinkage}
    holdout = DataLoader(torch.utils.data.ConcatDataset([e.dataset.eval() for e in spec.scenario.test_stream]),
                         batch_size=1000)
    for temperature in args.temperatures:
        model.task_temperature = temperature
        r = evaluate_task_inference(model, holdout)
        out[f"temperature {temperature:g}"] = {
            m: {"task": round(100 * r["task_accuracy"][m]["calibrated"], 2),
                "task_raw": round(100 * r["task_accuracy"][m]["raw"], 2),
                "acc": round(100 * r["accuracy"][m]["calibrated"], 2),
                "acc_raw": round(100 * r["accuracy"][m]["raw"], 2)} for m in r["task_accuracy"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
