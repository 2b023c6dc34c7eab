"""HAT on the Permuted FMNIST holdout, one configuration: the ``--tune`` code path (same benchmark
spec, settings and ``run_method``) for settings the ``--tune`` grid does not cover (the embedding
learning rate, the quota). Prints and writes one trial as JSON.

    python benchmarks/pfmnist_hat_holdout.py EMBEDDING_LR REG_COEF OUT.json [QUOTA]
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from avalanche_hat.bench import cli  # noqa: E402
from avalanche_hat.bench.data import make_benchmark  # noqa: E402
from avalanche_hat.bench.runner import run_method  # noqa: E402
from avalanche_hat.mechanism import fused  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    elr, reg, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    quota = float(sys.argv[4]) if len(sys.argv) > 4 else None
    args = cli.build_parser().parse_args(["--benchmark", "pfmnist", "--tune", "--methods", "HAT"])
    cli.resolve_defaults(args)
    spec = make_benchmark("pfmnist", holdout=0.1, num_tasks=args.tasks, train_per_task=args.train_per_task,
                          test_per_task=args.test_per_task)
    settings, hp = cli._settings_and_hp(args, spec)
    fused.build()  # before the timed run
    hp = replace(hp, hat_embedding_lr=elr, hat_reg_coef=reg, hat_quota=quota)
    r = run_method("HAT", spec.scenario, settings, hp, 0, progress=False)
    trial = {"method": "HAT", "hat_embedding_lr": elr, "hat_reg_coef": reg, "hat_quota": quota, "seed": 0,
             "holdout_acc": r.acc, "bwt": r.bwt, "train_seconds": r.train_seconds, "owned": r.capacity["owned"],
             "usage": r.capacity["usage"]}
    print(json.dumps(trial))
    Path(out).write_text(json.dumps(trial))


if __name__ == "__main__":
    main()
