"""``avalanche-hat-bench`` / ``python -m avalanche_hat.bench``: the leaderboard of HAT against
Avalanche's strategies on one task-incremental benchmark, same network, budget and seeds
(``--scenario class``: the class-incremental leaderboard, no task labels at test time).

With no arguments: Split Fashion-MNIST (5 tasks of 2 classes, real data from Debian's
``dataset-fashion-mnist`` or ``--data-root``), all 8 methods, one seed, on the CPU; results in
``./leaderboard-results``. ``--tune`` picks EWC's, SI's, LwF's and HAT's coefficients on a 10%
holdout of the training data instead (never the test set).

Under ``torchrun --nproc_per_node=N`` HAT trains data-parallel (DDP; ``--device cuda``: NCCL, one GPU
per process; ``--device cpu``: Gloo), ``--batch-size`` per process; only rank 0 prints and writes
files. The other methods are reported as skipped: Avalanche 0.6.0 never wraps them in DDP.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

DEFAULT_OUT = "leaderboard-results"

NOT_DISTRIBUTED = ("not run under torchrun: Avalanche 0.6.0 never wraps its strategies in DistributedDataParallel, "
                   "so each process would train its own model; run it in one process")

# The default budget (the same for every method); epochs per benchmark in options.BUDGETS.
DEFAULTS = {"batch_size": 64, "lr": 0.01, "optimizer": "sgd", "network": "mlp"}

TUNING_GRID = {
    "EWC": ("ewc_lambda", [1e2, 1e3, 1e4, 1e5, 1e6]),
    # Avalanche's SI clips every importance at 1e-3, so useful coefficients are large.
    "SI": ("si_lambda", [1.0, 10.0, 100.0, 1e3, 1e4]),
    "LwF": ("lwf_alpha", [0.1, 1.0, 10.0]),
    "HAT": ("hat_reg_coef", [0.1, 0.75, 1.5, 2.5]),
}
# Class-incremental: SI's and LwF's grids go further up (their best task-incremental values are at
# or near the top of the grids above, and class-incremental forgetting is stronger).
CLASS_TUNING_GRID = {
    **TUNING_GRID,
    "SI": ("si_lambda", [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6]),
    "LwF": ("lwf_alpha", [0.1, 1.0, 10.0, 100.0, 1000.0]),
}
#: Second stages of the search, after the first coefficient is chosen (coordinate search), per
#: benchmark: on Permuted FMNIST every task needs its own first-layer units, so HAT's quota is
#: searched too (None: 1/T).
SECOND_STAGES = {"pfmnist": {"HAT": ("hat_quota", [None, 0.2, 0.3])}}
#: Per benchmark, grids that replace the first stage above (pfmnist: shorter, sized for 2 shared
#: cores; the ends of the Split FMNIST grids that lost there are left out).
BENCHMARK_GRIDS = {"pfmnist": {
    "EWC": ("ewc_lambda", [1e2, 1e3, 1e4]),
    "SI": ("si_lambda", [100.0, 1e3, 1e4]),
    "LwF": ("lwf_alpha", [1.0, 10.0]),
    "HAT": ("hat_reg_coef", [0.75, 1.5]),
}}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where it tells something: not for flags (``store_true`` /
    ``store_false``), not for a default of None, and not where the help already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0 or action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command's options. Imports neither torch, Avalanche nor timm (``--help`` stays quick)."""
    from .options import BENCHMARKS, CLASS_METHODS, METHODS, HyperParameters, default_help

    hp = HyperParameters()
    p = argparse.ArgumentParser(
        prog="avalanche-hat-bench",
        description="Leaderboard of HAT and Avalanche's continual-learning strategies on one "
                    "benchmark (same network, budget and seeds for every method). Results go to --out "
                    f"(default ./{DEFAULT_OUT}/).",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", choices=BENCHMARKS, default=None,
                   help="fmnist: Split Fashion-MNIST, 5 tasks (Debian's dataset-fashion-mnist or --data-root); "
                        "pfmnist: Permuted Fashion-MNIST, 10 tasks of 10 classes (--tasks N for more); "
                        "digits: scikit-learn's digits, 5 tasks (tiny, no download); cifar10: Split CIFAR-10, "
                        "5 tasks; cifar100 / cifar100-20: Split CIFAR-100, 10 / 20 tasks (downloaded) "
                        "(default: fmnist, or pfmnist when --tasks is given)")
    g.add_argument("--data-root", default=None,
                   help="folder holding the data set (Fashion-MNIST: its four IDX files; CIFAR: download "
                        "target); a folder without the data is an error (default: Debian's "
                        "/usr/share/datasets/fashion-mnist, Avalanche's data folder for CIFAR)")
    g.add_argument("--tasks", type=int, default=None, metavar="N",
                   help="pfmnist: number of permutations (default 10); implies --benchmark pfmnist")
    g.add_argument("--train-per-task", type=int, default=None, metavar="IMAGES",
                   help="pfmnist: training images per task, a stratified subset, the same images in every "
                        "task (default: min(3000, 30000 / tasks))")
    g.add_argument("--test-per-task", type=int, default=None, metavar="IMAGES",
                   help="pfmnist: evaluation images per task (default: min(1000, 10000 / tasks))")
    g.add_argument("--train-fraction", type=float, default=1.0,
                   help="train on this stratified share of the training data (test set unchanged)")
    g.add_argument("--scenario", choices=("task", "class"), default="task",
                   help="task: task-incremental (task labels, per-task heads); class: class-incremental "
                        "(every experience labelled task 0, one head over all classes; HAT predicts the task "
                        "at test time; methods: " + ", ".join(CLASS_METHODS) + ")")
    g = p.add_argument_group("methods and budget (the same for every method)")
    g.add_argument("--methods", nargs="+", default=["all"], metavar="METHOD",
                   help=f"any of {', '.join(METHODS)} (comma or space separated), or all")
    g.add_argument("--network", default=DEFAULTS["network"],
                   help="mlp, cnn, or a timm family of avalanche_hat.timm_models (hat_X and cl_X), e.g. alexnet")
    g.add_argument("--width", type=int, default=None, help="hidden width of mlp (default 400) / cnn (default 256)")
    g.add_argument("--epochs", type=int, default=None,
                   help="epochs per task (default: 3; pfmnist: 10; PackNet needs >= 2)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="training batch size")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default=DEFAULTS["optimizer"],
                   help="sgd has momentum 0.9; the state is reset at every task for every method")
    g.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; mean and std reported")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is robust when the cores are shared; 0: as many as torch picks)")
    g = p.add_argument_group("method hyper-parameters (coefficients: the values chosen with --tune for the "
                             "benchmark; see docs/benchmarks/leaderboard.md)")
    g.add_argument("--ewc-lambda", type=float, default=None, help=default_help("ewc_lambda"))
    g.add_argument("--si-lambda", type=float, default=None, help=default_help("si_lambda"))
    g.add_argument("--lwf-alpha", type=float, default=None, help=default_help("lwf_alpha"))
    g.add_argument("--lwf-temperature", type=float, default=hp.lwf_temperature,
                   help="LwF's distillation temperature (Avalanche's default, not tuned)")
    g.add_argument("--replay-mem-size", type=int, default=hp.replay_mem_size,
                   help="Replay's and ER-ACE's buffer, A-GEM's memory (split evenly over the tasks)")
    g.add_argument("--hat-reg-coef", type=float, default=None, help=default_help("hat_reg_coef"))
    g.add_argument("--hat-quota", type=float, default=None,
                   help="share of each layer's free units a task may use before HAT's penalty acts; "
                        + default_help("hat_quota").replace("default: 1/T", "default: 1/T, T the number of tasks"))
    g.add_argument("--hat-max-mask-scale", type=float, default=hp.hat_max_mask_scale,
                   help="s_max of HAT's mask-scale schedule (original HAT's value)")
    g.add_argument("--hat-embedding-lr", type=float, default=None,
                   help="learning rate of HAT's mask embeddings; " + default_help("hat_embedding_lr", none="the weights' --lr"))
    g.add_argument("--hat-schedule", choices=("cosine", "linear"), default=hp.hat_schedule,
                   help="cosine: HAT-CL Eq. 6; linear: original HAT Eq. 4")
    g.add_argument("--hat-scale-unit", choices=("epoch", "experience"), default=hp.hat_scale_unit,
                   help="what one period of HAT's mask-scale schedule spans")
    g.add_argument("--hat-task-score", choices=("msp", "energy", "entropy", "reject", "mahalanobis"),
                   default=hp.hat_task_score, help="--scenario class: the score that predicts HAT's task")
    g.add_argument("--no-hat-reject-head", dest="hat_reject_head", action="store_false",
                   help="--scenario class: train no reject logit with rotated negatives (by default HAT "
                        "trains one per head)")
    g.add_argument("--er-ace-batch-size-mem", type=int, default=hp.er_ace_batch_size_mem,
                   help="ER-ACE's replayed samples per step (default: the batch size)")
    g.add_argument("--agem-sample-size", type=int, default=hp.agem_sample_size,
                   help="A-GEM's memory samples per reference gradient (default: the batch size)")
    g = p.add_argument_group("modes and output")
    g.add_argument("--tune", action="store_true",
                   help="choose EWC/SI/LwF/HAT coefficients on a 10%% holdout of the training data "
                        "(grid: " + "; ".join(f"{m} {k} {v}" for m, (k, v) in TUNING_GRID.items()) + "; "
                        "--scenario class: SI si_lambda up to 1e6, LwF lwf_alpha up to 1000; pfmnist: "
                        + "; ".join(f"{m} {k} {v}" for m, (k, v) in BENCHMARK_GRIDS["pfmnist"].items())
                        + ", then HAT hat_quota from 1/T, 0.2, 0.3)")
    g.add_argument("--holdout", type=float, default=0.1, help="holdout share used by --tune")
    g.add_argument("--no-forgetting", action="store_true",
                   help="skip the Table 2 experiment (forget task 0 of the trained HAT model)")
    g.add_argument("--forget-task", type=int, default=0, help="task forgotten in the Table 2 experiment")
    g.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                   help="no training: write the tables and figures again from leaderboard JSONs (several: "
                        "their runs merged, e.g. methods run separately on the same benchmark and budget)")
    g.add_argument("--out", default=DEFAULT_OUT, help="folder for the Markdown, CSV, JSON and PNG files")
    g.add_argument("--name", default=None, help="file name stem (default: the benchmark name)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve_defaults(args) -> str:
    """Fill the options whose default depends on the benchmark (in place) and return where the
    coefficients come from. Raises ValueError for options that do not fit the benchmark."""
    from .options import BUDGETS, DEFAULT_EPOCHS, TASKS, HyperParameters, pfmnist_sizes, tuned_coefficients

    if args.benchmark is None:
        args.benchmark = "pfmnist" if args.tasks is not None else "fmnist"
    if args.benchmark != "pfmnist":
        for flag, value in (("--tasks", args.tasks), ("--train-per-task", args.train_per_task),
                            ("--test-per-task", args.test_per_task)):
            if value is not None:
                raise ValueError(f"{flag} applies to --benchmark pfmnist only ({args.benchmark} has "
                                 f"{TASKS[args.benchmark]} fixed tasks; --train-fraction subsamples it)")
    else:
        if args.scenario != "task":
            raise ValueError("--benchmark pfmnist is task-incremental (every task has the same 10 classes): "
                             "drop --scenario class")
        args.tasks = TASKS["pfmnist"] if args.tasks is None else args.tasks
        if args.tasks < 2:
            raise ValueError(f"--tasks {args.tasks}: a continual-learning sequence needs at least 2 tasks")
        train, test = pfmnist_sizes(args.tasks)
        args.train_per_task = args.train_per_task or train
        args.test_per_task = args.test_per_task or test
    if args.epochs is None:
        args.epochs = BUDGETS.get(args.benchmark, {}).get("epochs", DEFAULT_EPOCHS)
    tuned, source = tuned_coefficients(args.benchmark, args.scenario)
    if args.benchmark == "pfmnist" and args.tasks != TASKS["pfmnist"] and "hat_quota" in tuned:
        del tuned["hat_quota"]  # chosen for 10 tasks: a longer sequence keeps 1/T
        source += f"; HAT's quota 1/T for {args.tasks} tasks"
    for key, value in tuned.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    hp_defaults = HyperParameters()
    for key in ("ewc_lambda", "si_lambda", "lwf_alpha", "hat_reg_coef"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(hp_defaults, key))
    return source


def _quiet_warnings() -> None:
    """Hide the notices Avalanche prints on every run (its own deprecations, no logger, no QP
    solver); every other warning is shown."""
    warnings.filterwarnings("ignore", message="No loggers specified")
    warnings.filterwarnings("ignore", message="no QP solver found")
    # Avalanche's @deprecated resets the filters to "always" before warning, so filter at display.
    show = warnings.showwarning
    if getattr(show, "_avalanche_hat_quiet", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecationWarning) and "Call to deprecated function" in str(message):
            return
        show(message, category, filename, lineno, file, line)

    showwarning._avalanche_hat_quiet = True
    warnings.showwarning = showwarning


def _settings_and_hp(args, spec):
    from .strategies import HyperParameters, TrainSettings

    settings = TrainSettings(
        network=args.network, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, device=args.device, num_tasks=spec.num_tasks,
        classes_per_task=spec.classes_per_task, in_chans=spec.in_chans, img_size=spec.img_size,
        scenario=args.scenario, eval_seen_only=spec.name == "pfmnist",
    )
    hp = HyperParameters(
        ewc_lambda=args.ewc_lambda, si_lambda=args.si_lambda, lwf_alpha=args.lwf_alpha,
        lwf_temperature=args.lwf_temperature, replay_mem_size=args.replay_mem_size,
        hat_reg_coef=args.hat_reg_coef, hat_quota=args.hat_quota, hat_max_mask_scale=args.hat_max_mask_scale, hat_schedule=args.hat_schedule,
        hat_scale_unit=args.hat_scale_unit, hat_task_score=args.hat_task_score,
        hat_reject_head=args.hat_reject_head, er_ace_batch_size_mem=args.er_ace_batch_size_mem,
        agem_sample_size=args.agem_sample_size, hat_embedding_lr=args.hat_embedding_lr,
    )
    return settings, hp


def _command(argv) -> str:
    return "avalanche-hat-bench" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_json:
        out = None if args.out == DEFAULT_OUT else args.out
        try:
            return _rerender([Path(p) for p in args.from_json], out, args.name, plots=not args.no_plots)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        args.coefficients_source = resolve_defaults(args)
    except ValueError as err:
        parser.error(str(err))
    import torch

    from .data import DataNotFound, make_benchmark
    from .strategies import resolve_methods
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        methods = resolve_methods(args.methods, args.scenario)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = {}
    if _under_torchrun():
        error = _start_distributed(args)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        skipped = {m: NOT_DISTRIBUTED for m in methods if m != "HAT"}
    if args.scenario == "class" and not args.no_forgetting:
        args.no_forgetting = True  # Table 2 forgets a task by its id: a task-incremental experiment
    if "PackNet" in methods and args.epochs < 2 and args.scenario == "task":
        print("error: PackNet prunes after the first epochs and fine-tunes after: use --epochs >= 2 "
              "or leave PackNet out (--methods ...)", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} but CUDA is not available here", file=sys.stderr)
        return 2
    # Under torchrun rank 0 loads (and, for CIFAR, downloads) the data first while the others wait,
    # so that no two processes write into the data folder at once.
    from avalanche_hat.training import is_distributed, is_main_process

    waits_for_rank0 = is_distributed() and not is_main_process()
    if waits_for_rank0:
        torch.distributed.barrier()
    try:
        extra = ({"num_tasks": args.tasks, "train_per_task": args.train_per_task,
                  "test_per_task": args.test_per_task} if args.benchmark == "pfmnist" else {})
        spec = make_benchmark(args.benchmark, data_root=args.data_root, train_fraction=args.train_fraction,
                              holdout=args.holdout if args.tune else None, scenario=args.scenario, **extra)
    except DataNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if is_distributed() and not waits_for_rank0:
            torch.distributed.barrier()
    out = Path(args.out)
    stem = args.name or (args.benchmark if args.scenario == "task" else f"{args.benchmark}_class")
    from avalanche_hat.training import destroy_distributed

    try:
        if args.tune:
            return _tune(args, argv, spec, [m for m in methods if m not in skipped], out, stem)
        return _leaderboard(args, argv, spec, methods, out, stem, skipped)
    finally:
        destroy_distributed()  # no-op in one process


def _under_torchrun() -> bool:
    """torchrun sets LOCAL_RANK (and RANK, WORLD_SIZE, ...) for every process it starts."""
    import os

    return "LOCAL_RANK" in os.environ


def _start_distributed(args) -> str | None:
    """Join torchrun's process group (NCCL with ``--device cuda``: ``cuda:LOCAL_RANK``; Gloo with
    ``--device cpu``); other ranks than 0 print nothing. Returns an error message or None."""
    import os

    import torch

    from avalanche_hat.training import init_distributed, is_main_process

    if args.device not in ("cpu", "cuda"):
        return (f"--device {args.device}: under torchrun every process uses its own GPU (cuda:LOCAL_RANK); "
                "pass --device cuda, or --device cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda but CUDA is not available here: pass --device cpu (Gloo)"
    try:
        args.device = str(init_distributed(backend="nccl" if args.device == "cuda" else "gloo"))
    except RuntimeError as err:
        return str(err)
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")
        args.no_progress = True
    return None


def _distributed_record(settings) -> dict | None:
    from avalanche_hat.training import get_world_size, is_distributed

    if not is_distributed():
        return None
    import torch.distributed as dist

    return {"processes": get_world_size(), "backend": dist.get_backend(),
            "batch_size_per_process": settings.batch_size,
            "global_batch_size": settings.batch_size * get_world_size(),
            "note": "HAT only (DDP); train_seconds and peak memory are rank 0's"}


def _leaderboard(args, argv, spec, methods, out: Path, stem: str, skipped: dict | None = None) -> int:
    import torch

    from avalanche_hat.training import is_main_process

    from .data import loading_seconds
    from .runner import run_method
    from .strategies import UnsupportedNetwork

    settings, hp = _settings_and_hp(args, spec)
    distributed = _distributed_record(settings)
    fused_in_use = _build_kernels_before_timing([m for m in methods if m not in (skipped or {})])
    load_epoch = loading_seconds(spec.scenario, settings.batch_size)
    processes = "" if distributed is None else (f" x {distributed['processes']} processes "
                                                f"({distributed['backend']}, batch per process)")
    print(f"{spec.name} ({spec.scenario_kind}-incremental): {spec.num_tasks} tasks of {spec.classes_per_task} "
          f"classes, {spec.train_size} training / "
          f"{spec.test_size} test images from {spec.source} (loaded in {spec.load_seconds:.1f} s); "
          f"network {settings.network}, {settings.epochs} epochs per task, batch {settings.batch_size}, "
          f"{settings.optimizer} lr {settings.lr}, seeds {args.seeds}, device {settings.device}{processes}; one "
          f"pass of the data loader over every task takes {load_epoch:.1f} s", flush=True)
    wall = time.perf_counter()
    results = []
    hat_models = {}
    skipped: dict[str, str] = dict(skipped or {})
    for method in skipped:
        print(f"  {method:>13}: skipped: {skipped[method]}", flush=True)
    for seed in args.seeds:
        for method in methods:
            if method in skipped:
                continue
            try:
                r = run_method(method, spec.scenario, settings, hp, seed, progress=not args.no_progress,
                               keep_model=(method == "HAT"))
            except UnsupportedNetwork as err:
                skipped[method] = str(err)
                print(f"  {method:>13}: skipped: {err}", flush=True)
                continue
            if method == "HAT":
                hat_models[seed] = r.model
                r.model = None
            results.append(r)
            bwt = "n/a" if r.bwt != r.bwt else f"{100 * r.bwt:+.2f}%"
            task_id = ""
            if r.task_inference:
                score = r.task_inference["task_score"]
                task_id = f"  task-id {100 * r.task_inference['task_accuracy'][score]['calibrated']:.2f}% ({score})"
            print(f"  {method:>13} seed {seed}: ACC {100 * r.acc:.2f}%  BWT {bwt}  train {r.train_seconds:.1f} s"
                  + task_id, flush=True)
    wall = time.perf_counter() - wall
    config = {
        "command": _command(argv), "benchmark": spec.describe(), "methods": methods, "seeds": args.seeds,
        "settings": asdict(settings), "hyper_parameters": {m: r.config for m, r in
                                                           {r.method: r for r in results}.items()},
        "hyper_parameter_values": asdict(hp),
        "total_wall_seconds": round(wall, 1),
        "data_loading_seconds_per_epoch_all_tasks": round(load_epoch, 2),
        "torch_threads": torch.get_num_threads(),
        "skipped": skipped,
        "coefficients": args.coefficients_source,
    }
    if fused_in_use is not None:
        config["hat_fused_kernels"] = ("in use, built before the timed runs" if fused_in_use
                                       else "off (PyTorch operations)")
    if distributed is not None:
        config["distributed"] = distributed
    if not is_main_process():
        return 0  # every rank holds the same results: rank 0 writes them
    forgetting = None
    if "HAT" in methods and not args.no_forgetting:
        from .forgetting import forgetting_experiment

        forgetting = forgetting_experiment(hat_models[args.seeds[0]], spec.scenario.test_stream,
                                           task=args.forget_task, device=settings.device)
        config["forgetting"] = forgetting.to_dict()
    paths = publish(out, stem, results, config, plots=not args.no_plots)
    print(f"total wall time {wall:.1f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def publish(out: Path, stem: str, results, config: dict, plots: bool = True, env: dict | None = None) -> dict:
    """Write the tables (Markdown, CSV, JSON) and figures of a leaderboard and print it."""
    from .forgetting import ForgettingResult
    from .report import aggregate, text_table, write_outputs

    rows = aggregate(results)
    seeds = config["seeds"]
    name = config["benchmark"]["benchmark"]
    skipped = config.get("skipped", {})
    forgetting = ForgettingResult.from_dict(config["forgetting"]) if config.get("forgetting") else None
    extra = []
    if forgetting is not None:
        extra += [f"## Forgetting task {forgetting.task} (HAT, seed {seeds[0]}; paper Table 2)", "",
                  forgetting.to_markdown(), ""]
    hat_result = next((r for r in results if r.method == "HAT"), None)
    if hat_result is not None and hat_result.capacity:
        extra += [f"## HAT capacity per task (seed {hat_result.seed})", "", hat_result.capacity["table"], ""]
    if hat_result is not None and hat_result.task_inference:
        from .report import task_inference_markdown

        extra += ["## HAT without task labels: task-id prediction", "",
                  task_inference_markdown([r for r in results if r.method == "HAT"]), ""]
    from .report import seen_markdown, sequence_markdown

    seen = seen_markdown(results)
    if seen:
        extra += ["## Mean accuracy over the tasks seen (%), after k tasks (mean over seeds)", "", seen, ""]
    sequence = sequence_markdown([r for r in results if r.seed == seeds[0]])
    if sequence:
        extra += [f"## Over the sequence (seed {seeds[0]})", "", sequence, ""]
    if skipped:
        extra += ["## Skipped", "", *(f"- {m}: {why}" for m, why in skipped.items()), ""]
    notes_file = out / f"{stem}_notes.md"  # hand-written reading of the board, kept across re-renders
    notes = notes_file.read_text() if notes_file.exists() else ""
    paths = write_outputs(out, stem, rows, results, config, "\n".join(extra), env=env, notes=notes)
    if plots:
        from . import plots as figures

        first = [r for r in results if r.seed == seeds[0]]
        paths["matrices"] = figures.accuracy_matrices(
            first, out / f"{stem}_accuracy_matrices.png", title=f"{name}: accuracy (%) after each task, seed {seeds[0]}",
            vmin=0.0 if config["benchmark"].get("scenario") == "class-incremental"
            else 100.0 / config["benchmark"].get("classes_per_task", 2))
        if seen:
            paths["seen"] = figures.mean_accuracy_seen(
                results, out / f"{stem}_mean_accuracy_seen.png",
                title=f"{name}: mean accuracy over the tasks seen, mean over seeds {seeds}",
                chance=1.0 / config["benchmark"].get("classes_per_task", 2))
        if sequence:
            paths["sequence"] = figures.long_sequence(
                [r for r in results if r.seed == seeds[0]], out / f"{stem}_sequence.png",
                title=f"{name}, {config['benchmark'].get('num_tasks')} tasks, seed {seeds[0]}")
        if hat_result is not None and hat_result.capacity:
            paths["capacity"] = figures.hat_capacity(hat_result.capacity, out / f"{stem}_hat_capacity.png",
                                                     title=f"HAT on {name}, seed {hat_result.seed}")
        if forgetting is not None:
            paths["forgetting"] = figures.forgetting_bars(forgetting.before, forgetting.after, forgetting.task,
                                                          out / f"{stem}_forgetting.png", chance=max(forgetting.chance))
    print()
    print(text_table(rows))
    for method, why in skipped.items():
        print(f"{method}: skipped ({why})")
    if forgetting is not None:
        print()
        print(f"Forgetting task {forgetting.task} of HAT (seed {seeds[0]}), accuracy (%):")
        print(forgetting.to_markdown())
    print()
    return paths


def _comparable(part):
    """A benchmark or settings record without what differs between processes of one board (the
    seconds spent loading the data)."""
    return {k: v for k, v in part.items() if k != "load_seconds"} if isinstance(part, dict) else part


def merge_leaderboards(datas: list[dict]) -> dict:
    """Several leaderboard JSONs of one benchmark and budget as one: the runs of all (in order; a
    method and seed run twice is an error), the first one's configuration with the methods, seeds,
    hyper-parameters, skipped methods and wall time of all. Raises ValueError where the benchmark or
    the settings differ."""
    base = json.loads(json.dumps(datas[0]))
    config = base["config"]
    seen = {(r["method"], r["seed"]) for r in base["runs"]}
    for k, data in enumerate(datas[1:], start=1):
        other = data["config"]
        for key in ("benchmark", "settings"):
            if _comparable(other.get(key)) != _comparable(config.get(key)):
                raise ValueError(f"JSON {k + 1} has another {key} than the first: {other.get(key)} against "
                                 f"{config.get(key)}; only runs of the same benchmark and budget merge")
        for run in data["runs"]:
            if (run["method"], run["seed"]) in seen:
                raise ValueError(f"{run['method']} seed {run['seed']} is in more than one JSON")
            seen.add((run["method"], run["seed"]))
            base["runs"].append(run)
        config["methods"] += [m for m in other.get("methods", []) if m not in config["methods"]]
        config["seeds"] += [s for s in other.get("seeds", []) if s not in config["seeds"]]
        config.setdefault("hyper_parameters", {}).update(other.get("hyper_parameters", {}))
        config.setdefault("skipped", {}).update(other.get("skipped", {}))
        config["total_wall_seconds"] = config.get("total_wall_seconds", 0) + other.get("total_wall_seconds", 0)
        if other.get("forgetting") and not config.get("forgetting"):
            config["forgetting"] = other["forgetting"]
        config.setdefault("merged_commands", [config["command"]]).append(other["command"])
    return base


def _rerender(paths: list[Path], out: Path | None, stem: str | None, plots: bool) -> int:
    """Tables and figures again from leaderboard JSONs (no training; several: merged)."""
    from .runner import MethodResult

    data = merge_leaderboards([json.loads(Path(p).read_text()) for p in paths])
    results = [MethodResult.from_dict(run) for run in data["runs"]]
    out = Path(out) if out is not None else Path(paths[0]).parent
    stem = stem or Path(paths[0]).stem
    paths = publish(out, stem, results, data["config"], plots=plots, env=data.get("environment"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _show(value) -> str:
    return "1/T" if value is None else f"{value:g}"


def _tune(args, argv, spec, methods, out: Path, stem: str) -> int:
    """Grid search on the holdout: every value of each method's coefficient, the best by holdout ACC;
    where the benchmark has a second stage (:data:`SECOND_STAGES`), its values are then tried with the
    first coefficient fixed at its best (coordinate search)."""
    from .runner import run_method

    settings, hp = _settings_and_hp(args, spec)
    first = CLASS_TUNING_GRID if args.scenario == "class" else {**TUNING_GRID, **BENCHMARK_GRIDS.get(spec.name, {})}
    second = SECOND_STAGES.get(spec.name, {}) if args.scenario == "task" else {}
    grid = {m: [v, *([second[m]] if m in second else [])] for m, v in first.items() if m in methods}
    if not grid:
        print(f"error: --tune covers {', '.join(TUNING_GRID)}; none of them is in --methods", file=sys.stderr)
        return 2
    _build_kernels_before_timing(methods)
    print(f"tuning on {spec.evaluation_set}: {spec.train_size} training / {spec.test_size} holdout images"
          f"{' per task' if spec.per_task_images else ''}; {spec.num_tasks} tasks; seeds {args.seeds}", flush=True)
    start = time.perf_counter()
    trials, chosen = [], {}
    for method, stages in grid.items():
        best_hp, record = hp, {"grids": {}}
        for key, values in stages:
            scores = {}
            for value in values:
                accs = []
                for seed in args.seeds:
                    r = run_method(method, spec.scenario, settings, replace(best_hp, **{key: value}), seed,
                                   progress=not args.no_progress)
                    accs.append(r.acc)
                    trial = {"method": method, key: value, "seed": seed, "holdout_acc": r.acc, "bwt": r.bwt,
                             "train_seconds": r.train_seconds}
                    trial.update({k: getattr(best_hp, k) for k, _ in stages if k != key})
                    if r.task_inference:  # class-incremental HAT: every task score on the holdout
                        trial["task_inference"] = {k: r.task_inference[k] for k in ("task_accuracy", "accuracy")}
                    trials.append(trial)
                scores[value] = sum(accs) / len(accs)
                print(f"  {method:>5} {key}={_show(value)}: holdout ACC {100 * scores[value]:.2f}%", flush=True)
            best = max(scores, key=scores.get)
            best_hp = replace(best_hp, **{key: best})
            record[key] = best
            record["holdout_acc"] = scores[best]
            record["grids"][key] = {_show(k): v for k, v in scores.items()}
        record["grid"] = record["grids"][stages[0][0]]
        record["keys"] = [k for k, _ in stages]
        chosen[method] = record
    from avalanche_hat.training import is_main_process

    if not is_main_process():
        return 0  # every rank holds the same results: rank 0 writes them
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": _command(argv), "benchmark": spec.describe(), "settings": asdict(settings),
              "seeds": args.seeds, "chosen": chosen, "trials": trials,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    path = out / f"{stem}_tuning.json"
    path.write_text(json.dumps(record, indent=2))
    print()
    flags = []
    for method, c in chosen.items():
        print(f"{method}: " + ", ".join(f"{k} = {_show(c[k])}" for k in c["keys"])
              + f" (holdout ACC {100 * c['holdout_acc']:.2f}%)")
        flags += [f"--{k.replace('_', '-')} {_show(c[k])}" for k in c["keys"] if c[k] is not None]
    print(f"\nuse them with: avalanche-hat-bench {' '.join(flags)}\nwrote {path}")
    return 0


def _build_kernels_before_timing(methods) -> bool | None:
    """Build (or load) HAT's fused CPU kernels before any timed run, so that their one-off build is
    never counted as training time; prints whether they are in use. None when HAT is not run."""
    if "HAT" not in methods:
        return None
    from avalanche_hat.mechanism import fused

    start = time.perf_counter()
    in_use = fused.build()
    print(f"HAT's fused CPU kernels {'in use' if in_use else 'off (PyTorch operations)'}, ready in "
          f"{time.perf_counter() - start:.1f} s (before any timed run)", flush=True)
    return in_use


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
