"""One method on the Permuted FMNIST holdout (10% of the training data, seed 0), any of the
command's flags: the ``--tune`` code path (same benchmark spec, settings and ``run_method``) for
budgets and settings the ``--tune`` grid does not cover. Prints and writes one trial as JSON (with
the diagonal and last row of the accuracy matrix, to see learning and forgetting apart).

    python benchmarks/pfmnist_holdout_trial.py METHOD OUT.json [--data-seed D] [avalanche-hat-bench flags ...]
    e.g. python benchmarks/pfmnist_holdout_trial.py HAT hat.json --epochs 10 --hat-quota 0.3

``--data-seed D`` draws another holdout (and training subset and permutations) from seed ``D``
(default 0, the ``--tune`` holdout), to see how much one holdout draw decides a comparison.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from avalanche_hat.bench import cli  # noqa: E402
from avalanche_hat.bench.data import make_benchmark  # noqa: E402
from avalanche_hat.bench.runner import run_method  # noqa: E402


def split_data_seed(flags: list[str]) -> tuple[int, list[str]]:
    """``--data-seed D`` (default 0) taken out of the flags passed on to the bench's parser."""
    if "--data-seed" not in flags:
        return 0, flags
    i = flags.index("--data-seed")
    return int(flags[i + 1]), flags[:i] + flags[i + 2:]


def main() -> None:
    torch.set_num_threads(1)
    method, out, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    data_seed, flags = split_data_seed(flags)
    args = cli.build_parser().parse_args(["--benchmark", "pfmnist", "--tune", "--methods", method, *flags])
    cli.resolve_defaults(args)
    spec = make_benchmark("pfmnist", holdout=0.1, num_tasks=args.tasks, train_per_task=args.train_per_task,
                          test_per_task=args.test_per_task, data_seed=data_seed)
    settings, hp = cli._settings_and_hp(args, spec)
    if method == "HAT":
        from avalanche_hat.mechanism import fused

        fused.build()  # before the timed run
    start = time.perf_counter()
    r = run_method(method, spec.scenario, settings, hp, 0, progress=False)
    trial = {"method": method, "flags": flags, "data_seed": data_seed, "seed": 0, "holdout_acc": r.acc, "bwt": r.bwt,
             "train_seconds": r.train_seconds, "wall_seconds": time.perf_counter() - start,
             "steps_per_task": r.task_steps[:1], "diagonal": [r.matrix[i][i] for i in range(len(r.matrix))],
             "final": r.final, "owned": (r.capacity or {}).get("owned")}
    print(json.dumps(trial))
    Path(out).write_text(json.dumps(trial))


if __name__ == "__main__":
    main()
