"""What the leaderboard command offers, without importing torch, Avalanche or timm (so that
``avalanche-hat-bench --help`` is quick): the benchmarks, the methods, the shared training settings,
each method's hyper-parameters and the coefficients chosen with ``--tune`` for each benchmark."""
from __future__ import annotations

from dataclasses import dataclass

BENCHMARKS = ("fmnist", "pfmnist", "digits", "cifar10", "cifar100", "cifar100-20")
#: "task": task-incremental (a task label per experience, class ids from 0 in each); "class":
#: class-incremental (every experience labelled task 0, global class ids), as
#: ``SplitFMNIST(..., return_task_id=False)``.
SCENARIOS = ("task", "class")
#: Tasks of each benchmark (pfmnist: the default; ``--tasks`` changes it).
TASKS = {"fmnist": 5, "pfmnist": 10, "digits": 5, "cifar10": 5, "cifar100": 10, "cifar100-20": 20}

METHODS = ("HAT", "Naive", "EWC", "SI", "LwF", "PackNet", "Replay", "A-GEM", "JointTraining")
#: The methods of the class-incremental leaderboard: PackNet needs the task id at test time; ER-ACE
#: (Caccia et al., 2022) is a strong rehearsal method made for class-incremental streams.
CLASS_METHODS = ("HAT", "Naive", "EWC", "SI", "LwF", "Replay", "ER-ACE", "JointTraining")


@dataclass
class TrainSettings:
    """What every method shares."""

    network: str = "mlp"
    width: int | None = None
    epochs: int = 2
    batch_size: int = 64
    eval_batch_size: int = 1000
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adam"
    lr: float = 0.01
    device: str = "cpu"
    num_tasks: int = 5
    classes_per_task: int = 2
    in_chans: int = 1
    img_size: int = 28
    scenario: str = "task"  # "task": per-task heads and task labels; "class": one head over all classes
    eval_seen_only: bool = False  # evaluate after each task on the tasks learned so far only (long sequences)

    @property
    def class_incremental(self) -> bool:
        return self.scenario == "class"


@dataclass
class HyperParameters:
    """Each method's own hyper-parameters. Defaults: chosen on a 10% holdout of Split FMNIST's
    training data (``--tune``, never the test set); see ``docs/benchmarks/leaderboard.md``."""

    # Chosen with `avalanche-hat-bench --tune` (Split FMNIST, 3 epochs, 10% holdout of the training
    # data, seed 0; benchmarks/results/fmnist_tuning.json): the grid value with the best holdout ACC.
    ewc_lambda: float = 1e5  # Avalanche EWC, mode "separate"; grid {1e2, 1e3, 1e4, 1e5, 1e6} (1e6 diverges)
    si_lambda: float = 1e3  # SI with the copy fix (CopyingSynapticIntelligencePlugin); grid {1, 10, 1e2, 1e3, 1e4}
    si_eps: float = 1e-7  # Avalanche's default
    lwf_alpha: float = 10.0  # grid {0.1, 1, 10}
    lwf_temperature: float = 2.0  # Avalanche's default
    replay_mem_size: int = 500  # not tuned: total buffer (experience-balanced), ~1% of Split FMNIST's training set
    packnet_post_prune_epochs: int | None = None  # None: half of the epochs (at least 1)
    packnet_prune: str = "equal"  # "equal": task i keeps 1/(T - i) of the free weights; or a float
    hat_reg_coef: float = 0.75  # HAT-CL layerwise usage penalty coefficient (original c); grid {0.1, 0.75, 1.5, 2.5}
    hat_quota: float | None = None  # share of each layer's free units a task may use unpenalised (None: 1/T)
    hat_max_mask_scale: float = 400.0  # s_max, original HAT
    hat_schedule: str = "cosine"  # HAT-CL Eq. 6
    hat_scale_unit: str = "epoch"  # one period of the mask-scale schedule: "epoch" or "experience"
    # Learning rate of the mask embeddings (None: the weights'). A mask closes only when the usage
    # penalty has moved its embedding from the dense init (1) below 0; with few steps per task
    # (Permuted FMNIST here: 47 per epoch) the weights' rate never gets there and task 0 keeps every unit.
    hat_embedding_lr: float | None = None
    # Class-incremental HAT (HATClassIncrementalModel), chosen on the holdout of Split FMNIST's training
    # data: the task score and a reject logit per head trained with rotated negatives.
    hat_task_score: str = "mahalanobis"
    hat_reject_head: bool = True
    er_ace_batch_size_mem: int | None = None  # ER-ACE's replayed samples per step (None: the batch size)
    agem_sample_size: int | None = None  # A-GEM's memory samples per reference gradient (None: the batch size)



#: The method coefficients chosen with ``--tune`` (10% holdout of the training data, never the test
#: set) for each benchmark and scenario, with the tuning record they come from. A benchmark without
#: an entry runs with Split FMNIST's task-incremental values (the command says so).
TUNED = {
    ("fmnist", "task"): {
        "values": {"ewc_lambda": 1e5, "si_lambda": 1e3, "lwf_alpha": 10.0, "hat_reg_coef": 0.75},
        "record": "benchmarks/results/fmnist_tuning.json"},
    ("fmnist", "class"): {
        "values": {"ewc_lambda": 1e4, "si_lambda": 1e4, "lwf_alpha": 0.1, "hat_reg_coef": 0.75},
        "record": "benchmarks/results/fmnist_class_tuning.json"},
    # Chosen for 10 tasks; a longer sequence keeps every value but the quota (1/T there).
    ("pfmnist", "task"): {
        "values": {"ewc_lambda": 1e3, "si_lambda": 1e2, "lwf_alpha": 10.0, "hat_reg_coef": 0.75,
                   "hat_embedding_lr": 0.1, "hat_quota": 0.2},
        "record": "benchmarks/results/pfmnist_tuning.json"},
}
#: The coefficients ``TUNED`` sets (the other hyper-parameters have one default for every benchmark).
TUNED_KEYS = ("ewc_lambda", "si_lambda", "lwf_alpha", "hat_reg_coef", "hat_quota", "hat_embedding_lr")


def tuned_coefficients(benchmark: str, scenario: str = "task") -> tuple[dict, str]:
    """The coefficients for ``benchmark`` and where they come from: its own ``--tune`` record, or
    Split FMNIST's task-incremental values with a note that they were not tuned on it."""
    entry = TUNED.get((benchmark, scenario))
    if entry is not None:
        return dict(entry["values"]), f"tuned on {benchmark} ({scenario}-incremental): {entry['record']}"
    base = TUNED[("fmnist", "task")]
    return dict(base["values"]), (f"not tuned on {benchmark} ({scenario}-incremental): Split FMNIST's "
                                  f"task-incremental values ({base['record']}); run --tune for this benchmark")


def default_help(key: str, none: str = "1/T") -> str:
    """The defaults of one coefficient in ``--help``: per benchmark where tuned (``none``: how a
    default of None reads)."""
    hp = HyperParameters()
    parts = []
    for (bench, scenario), entry in TUNED.items():
        if key in entry["values"] and entry["values"][key] is not None:
            value = entry["values"][key]
            ten = " for 10 tasks" if key == "hat_quota" and bench == "pfmnist" else ""
            parts.append(f"{bench}{'' if scenario == 'task' else ' --scenario ' + scenario}: "
                         f"{_show(value)}{ten}")
    if not parts:
        return f"default: {_show(getattr(hp, key))}"
    other = "fmnist's" if key in TUNED[("fmnist", "task")]["values"] else (
        none if getattr(hp, key) is None else _show(getattr(hp, key)))
    return "default: the value tuned for the benchmark (" + ", ".join(parts) + f"; other benchmarks: {other})"


def _show(value) -> str:
    if value is None:
        return "1/T"
    return f"{value:g}" if isinstance(value, float) else str(value)


#: The training budget of each benchmark when the command does not set it (the same for every
#: method). pfmnist: a stratified subset of each task's images, so that a sequence of any length
#: trains on 30,000 images per epoch in total (3,000 per task for 10 tasks, 1,500 for 20, 600 for 50),
#: and 10 epochs per task (470 steps for 10 tasks): at 2 epochs (94 steps) every method was still
#: learning and barely forgot, so plasticity alone ranked them (benchmarks/results/pfmnist_notes.md).
#: Sized for a 2-core machine (the whole 10-task board, tuning and 3 seeds of 9 methods, in about an hour).
BUDGETS = {"fmnist": {"epochs": 3}, "pfmnist": {"epochs": 10}}
DEFAULT_EPOCHS = 3


def pfmnist_sizes(num_tasks: int) -> tuple[int, int]:
    """Training and evaluation images per task of a pfmnist sequence of ``num_tasks`` tasks."""
    return min(3000, 30000 // num_tasks), min(1000, 10000 // num_tasks)
