"""HAT variants on a Permuted FMNIST holdout that the command's flags do not reach (the package's
options the leaderboard does not expose, and two quota rules it does not have), through the same
code path as ``benchmarks/pfmnist_holdout_trial.py``. Each variant patches one thing for this
process only; flags go to the command's parser as in the trial script.

    python benchmarks/pfmnist_hat_variants.py VARIANT OUT.json [--data-seed D] [avalanche-hat-bench flags ...]

Variants:
  constant-scale     mask scale s_max at every step (with --hat-reg-coef 0: the plain network)
  equal-quota        task t may take 1/(T - t) of the free units (PackNet's "equal" rule; the last task all)
  no-clamp           HATConfig(compensation_clamp=None): embeddings train at every mask scale
  normal-init        HATConfig(mask_init="normal"): the original HAT code's N(0, 1) embeddings
  hatcl              HAT(regularization="hatcl"): HAT-CL 0.1.1's penalty (quota N_l / T of each whole layer)
  global             HAT(regularization="global"): the original HAT paper's penalty (no quota: the share
                     of the free units of all layers the task takes, Eq. 5 of Serra et al. 2018)
  layer-quota-A-B    quota A on the first hidden layer, B on the second (e.g. layer-quota-0.3-0.1)
  finetune-K         the cosine schedule per epoch, then s_max for the last K epochs (masks fixed:
                     the sub-network is trained as it will be used, like PackNet's post-prune epochs)
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
from pfmnist_holdout_trial import split_data_seed  # noqa: E402  (this folder is on sys.path when run)


def apply_variant(name: str, hp, num_tasks: int, epochs: int) -> None:
    import functools

    import avalanche_hat
    import avalanche_hat.network as network
    import avalanche_hat.training.plugin as plugin
    from avalanche_hat import HATConfig
    from avalanche_hat.mechanism import regularization
    from avalanche_hat.mechanism.schedules import ConstantMaskScale, CosineMaskScale, MaskScaleSchedule

    if name == "constant-scale":
        hp.hat_schedule = ConstantMaskScale(hp.hat_max_mask_scale)
    elif name == "equal-quota":
        before = plugin.HATPlugin.before_training_exp

        def equal_share(self, strategy, **kwargs):
            before(self, strategy, **kwargs)
            self.quota = 1.0 / (num_tasks - self.task_id)

        plugin.HATPlugin.before_training_exp = equal_share
    elif name == "no-clamp":
        avalanche_hat.HATConfig = functools.partial(HATConfig, compensation_clamp=None)
    elif name == "normal-init":
        avalanche_hat.HATConfig = functools.partial(HATConfig, mask_init="normal")
    elif name == "hatcl":
        strategy = avalanche_hat.HAT
        avalanche_hat.HAT = lambda **kwargs: strategy(regularization="hatcl", **kwargs)
    elif name == "global":
        strategy = avalanche_hat.HAT
        avalanche_hat.HAT = lambda **kwargs: strategy(regularization="global", **kwargs)
    elif name.startswith("layer-quota-"):
        quotas = [float(q) for q in name[len("layer-quota-"):].split("-")]
        network.layerwise_usage_penalty = lambda pairs, quota: sum(
            regularization.layerwise_usage_penalty([pair], q) for pair, q in zip(pairs, quotas))
    elif name.startswith("finetune-"):
        fixed, cosine = int(name[len("finetune-"):]), CosineMaskScale(hp.hat_max_mask_scale)

        class CosineThenFixed(MaskScaleSchedule):  # progress over the experience
            def __call__(self, progress: float) -> float:
                position = progress * epochs  # in epochs
                return cosine(position % 1.0) if position < epochs - fixed else cosine.max_scale

        hp.hat_schedule, hp.hat_scale_unit = CosineThenFixed(), "experience"
    else:
        raise SystemExit(f"unknown variant {name!r}: see this script's docstring")


def main() -> None:
    torch.set_num_threads(1)
    variant, out, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    data_seed, flags = split_data_seed(flags)
    args = cli.build_parser().parse_args(["--benchmark", "pfmnist", "--tune", "--methods", "HAT", *flags])
    cli.resolve_defaults(args)
    spec = make_benchmark("pfmnist", holdout=0.1, num_tasks=args.tasks, train_per_task=args.train_per_task,
                          test_per_task=args.test_per_task, data_seed=data_seed)
    settings, hp = cli._settings_and_hp(args, spec)
    apply_variant(variant, hp, spec.num_tasks, settings.epochs)
    from avalanche_hat.mechanism import fused

    fused.build()  # before the timed run
    start = time.perf_counter()
    r = run_method("HAT", spec.scenario, settings, hp, 0, progress=False)
    trial = {"method": "HAT", "variant": variant, "flags": flags, "data_seed": data_seed, "seed": 0,
             "holdout_acc": r.acc, "bwt": r.bwt, "train_seconds": r.train_seconds,
             "wall_seconds": time.perf_counter() - start,
             "diagonal": [r.matrix[i][i] for i in range(len(r.matrix))], "owned_after_task": r.owned_after_task}
    print(json.dumps(trial))
    Path(out).write_text(json.dumps(trial))


if __name__ == "__main__":
    main()
