"""One function per method: the strategy with its documented configuration.

Every method gets the same network (plain twin or HAT twin of one architecture, one linear head per
task), the same optimizer family, learning rate, batch size, epochs per task and seed, and the
optimizer state is reset at the start of every task for all of them (momentum would otherwise move
weights of earlier tasks with zero gradient). What differs is the method and its own
hyper-parameters, listed in :class:`HyperParameters` with how each value was chosen.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .networks import MultiHeadNet, SingleHeadNet, build_trunk
from .options import CLASS_METHODS, METHODS, HyperParameters, TrainSettings  # noqa: F401  (re-exported)


# ----------------------------------------------------------------------------- shared pieces
def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=0.9)
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}: use 'sgd' or 'adam'")


def _plugin_base():
    from avalanche.core import SupervisedPlugin

    return SupervisedPlugin


class ResetOptimizerState(_plugin_base(), supports_distributed=True):
    """Start every task with an empty optimizer state (no momentum / Adam moments carried over)."""

    def before_training_exp(self, strategy, **kwargs):
        strategy.optimizer.state = defaultdict(dict)


def _synaptic_intelligence_base():
    from avalanche.training.plugins import SynapticIntelligencePlugin

    return SynapticIntelligencePlugin


class CopyingSynapticIntelligencePlugin(_synaptic_intelligence_base()):
    """Avalanche 0.6.0's SI with one fix: parameter snapshots are copies.

    Avalanche's ``extract_weights`` stores ``param.detach().cpu().flatten()``, which on the CPU is a
    *view* of the live parameter: the anchor weights and the per-step ``old``/``new`` weights all
    follow training, every importance is 0 and SI degenerates to fine-tuning. This subclass runs the
    same algorithm (same path integral, same damping ``eps``, same loss) on cloned snapshots.
    """

    @staticmethod
    @torch.no_grad()
    def _snapshot(model, target, excluded, grads: bool = False) -> None:
        for name, param in _synaptic_intelligence_base().allowed_parameters(model, excluded):
            src = param.grad if grads else param
            target[name].data = src.detach().flatten().to("cpu", copy=True)

    def before_training_exp(self, strategy, **kwargs):
        base = _synaptic_intelligence_base()
        base.create_syn_data(strategy.model, self.ewc_data, self.syn_data, self.excluded_parameters)
        self._snapshot(strategy.model, self.ewc_data[0], self.excluded_parameters)
        for trajectory in self.syn_data["trajectory"].values():
            trajectory.data.fill_(0.0)

    def before_training_iteration(self, strategy, **kwargs):
        self._snapshot(strategy.model, self.syn_data["old_theta"], self.excluded_parameters)

    @torch.no_grad()
    def after_training_iteration(self, strategy, **kwargs):
        model, syn = strategy.model, self.syn_data
        self._snapshot(model, syn["new_theta"], self.excluded_parameters)
        for name, param in _synaptic_intelligence_base().allowed_parameters(model, self.excluded_parameters):
            if param.grad is None:  # e.g. another task's head: no step, no contribution
                syn["grad"][name].data = torch.zeros_like(syn["new_theta"][name].data)
            else:
                syn["grad"][name].data = param.grad.detach().flatten().to("cpu", copy=True)
        for name in syn["trajectory"]:
            syn["trajectory"][name].data += syn["grad"][name].data * (
                syn["new_theta"][name].data - syn["old_theta"][name].data)


def _packnet_model_base():
    from avalanche.models.packnet import PackNetModel

    return PackNetModel


class UnsupportedNetwork(ValueError):
    """The method cannot run on the chosen network (reported as skipped, not as a crash)."""


class UnsupportedScenario(UnsupportedNetwork):
    """The method does not apply to the chosen scenario (reported as skipped, not as a crash)."""


class PackNetMultiHead(_packnet_model_base()):
    """Avalanche's ``PackNetModel`` around the shared trunk only, with per-task heads attached after
    wrapping (Avalanche 0.6.0's wrapper crashes on heads and does not pass the task id on).

    Each task's head is its own; the trunk's weights are pruned and frozen by PackNet."""

    def __init__(self, trunk: nn.Module, num_tasks: int, classes_per_task: int) -> None:
        num_features = trunk.num_features
        super().__init__(trunk)
        self.heads = nn.ModuleList(nn.Linear(num_features, classes_per_task) for _ in range(num_tasks))
        self.max_class_label = classes_per_task

    def forward(self, x: torch.Tensor, task_labels) -> torch.Tensor:
        if isinstance(task_labels, int):
            task_labels = torch.full((len(x),), task_labels, dtype=torch.long, device=x.device)
        out = x.new_zeros(len(x), self.max_class_label)
        for task in torch.unique(task_labels).tolist():
            sel = task_labels == task
            self.activate_task(min(task, self.task_count))
            out[sel] = self.heads[task](self.wrappee(x[sel]))
        return out

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.forward(x, int(task_label))


def packnet_prune_proportions(num_tasks: int, rule: str | float) -> list[float]:
    """``"equal"``: after task ``i`` keep ``1/(T-i)`` of the still-free weights for it (so every task
    gets about the same share); a float: that proportion pruned after every task."""
    if rule == "equal":
        return [1.0 - 1.0 / (num_tasks - i) for i in range(num_tasks)]
    return [float(rule)] * num_tasks


# ------------------------------------------------------------------------------- the methods
@dataclass
class Built:
    strategy: object
    model: nn.Module
    config: dict  # what the report records for this method


def _common(model, settings: TrainSettings, plugins, evaluator) -> dict:
    return dict(
        model=model,
        optimizer=make_optimizer(model.parameters(), settings),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=settings.batch_size,
        train_epochs=settings.epochs,
        eval_mb_size=settings.eval_batch_size,
        device=settings.device,
        plugins=[ResetOptimizerState(), *plugins],
        evaluator=evaluator,
    )


def _plain_model(settings: TrainSettings) -> nn.Module:
    """Per-task heads (task-incremental) or one head over all classes (class-incremental)."""
    trunk = build_trunk(settings.network, in_chans=settings.in_chans, img_size=settings.img_size,
                        width=settings.width)
    if settings.class_incremental:
        return SingleHeadNet(trunk, settings.num_tasks * settings.classes_per_task)
    return MultiHeadNet(trunk, settings.num_tasks, settings.classes_per_task)


def naive(settings, hp, plugins, evaluator) -> Built:
    from avalanche.training import Naive

    model = _plain_model(settings)
    return Built(Naive(**_common(model, settings, plugins, evaluator)), model,
                 {"description": "fine-tuning, no protection (lower bound)"})


def ewc(settings, hp, plugins, evaluator) -> Built:
    from avalanche.training import EWC

    model = _plain_model(settings)
    strategy = EWC(ewc_lambda=hp.ewc_lambda, mode="separate", **_common(model, settings, plugins, evaluator))
    return Built(strategy, model, {"description": "Avalanche EWC, mode=separate", "ewc_lambda": hp.ewc_lambda})


def si(settings, hp, plugins, evaluator) -> Built:
    from avalanche.training import Naive

    model = _plain_model(settings)
    si_plugin = CopyingSynapticIntelligencePlugin(si_lambda=hp.si_lambda, eps=hp.si_eps)
    strategy = Naive(**_common(model, settings, [si_plugin, *plugins], evaluator))
    return Built(strategy, model, {
        "description": "Avalanche SynapticIntelligencePlugin with parameter snapshots copied, not viewed "
                       "(0.6.0 stores views on the CPU: every importance 0)",
        "si_lambda": hp.si_lambda, "si_eps": hp.si_eps})


def lwf(settings, hp, plugins, evaluator) -> Built:
    from avalanche.training import LwF

    model = _plain_model(settings)
    strategy = LwF(alpha=hp.lwf_alpha, temperature=hp.lwf_temperature, **_common(model, settings, plugins, evaluator))
    what = "the classes seen so far" if settings.class_incremental else "earlier tasks' heads"
    return Built(strategy, model, {"description": f"Avalanche LwF (distillation on {what})",
                                   "lwf_alpha": hp.lwf_alpha, "lwf_temperature": hp.lwf_temperature})


def packnet(settings, hp, plugins, evaluator) -> Built:
    from avalanche.training import Naive
    from avalanche.models.packnet import PackNetPlugin

    if settings.class_incremental:
        raise UnsupportedScenario("PackNet selects its weights by task id at test time: it does not apply to a "
                                  "class-incremental stream")
    if settings.epochs < 2:
        raise ValueError("PackNet prunes after the first epochs and fine-tunes after: it needs --epochs >= 2")
    post = hp.packnet_post_prune_epochs or max(1, settings.epochs // 2)
    trunk = build_trunk(settings.network, in_chans=settings.in_chans, img_size=settings.img_size, width=settings.width)
    try:
        model = PackNetMultiHead(trunk, settings.num_tasks, settings.classes_per_task)
    except ValueError as err:  # Avalanche's PackNet wraps Linear and Conv layers only (no norms)
        raise UnsupportedNetwork(f"Avalanche's PackNet cannot wrap network {settings.network!r}: {err}") from None
    proportions = packnet_prune_proportions(settings.num_tasks, hp.packnet_prune)
    plugin = PackNetPlugin(post_prune_epochs=post, prune_proportion=proportions)
    # PackNetPlugin re-creates the optimizer at every task; with our plugins appended to a copy of
    # the list (Avalanche's PackNet wrapper drops user plugins).
    strategy = Naive(**_common(model, settings, [plugin, *plugins], evaluator))
    return Built(strategy, model, {
        "description": "Avalanche PackNetPlugin on the shared trunk, per-task heads attached after wrapping",
        "post_prune_epochs": post, "prune_proportions": [round(p, 4) for p in proportions]})


def replay(settings, hp, plugins, evaluator) -> Built:
    from avalanche.training import Replay

    model = _plain_model(settings)
    strategy = Replay(mem_size=hp.replay_mem_size, **_common(model, settings, plugins, evaluator))
    return Built(strategy, model, {"description": "Avalanche Replay, experience-balanced buffer; each batch "
                                                  "adds as many buffer samples as new ones",
                                   "replay_mem_size": hp.replay_mem_size})


def er_ace(settings, hp, plugins, evaluator) -> Built:
    from avalanche.training import ER_ACE

    if not settings.class_incremental:
        raise UnsupportedScenario("ER-ACE's asymmetric loss is made for one head over all classes: it runs in "
                                  "the class-incremental leaderboard")
    model = _plain_model(settings)
    memory_batch = hp.er_ace_batch_size_mem or settings.batch_size
    strategy = ER_ACE(mem_size=hp.replay_mem_size, batch_size_mem=memory_batch,
                      **_common(model, settings, plugins, evaluator))
    return Built(strategy, model, {"description": "Avalanche ER_ACE (asymmetric cross-entropy; replayed samples per "
                                                  "step = batch size, as many as Replay adds)",
                                   "replay_mem_size": hp.replay_mem_size, "er_ace_batch_size_mem": memory_batch})


def agem(settings, hp, plugins, evaluator) -> Built:
    from avalanche.training import AGEM

    if settings.class_incremental:
        raise UnsupportedScenario("A-GEM runs in the task-incremental leaderboards")
    model = _plain_model(settings)
    per_task = max(1, hp.replay_mem_size // settings.num_tasks)
    sample = hp.agem_sample_size or settings.batch_size
    strategy = AGEM(patterns_per_exp=per_task, sample_size=sample, **_common(model, settings, plugins, evaluator))
    return Built(strategy, model, {
        "description": "Avalanche AGEM (gradient projected against a reference gradient of memory samples); "
                       "memory: the Replay budget split evenly over the tasks",
        "agem_patterns_per_exp": per_task, "agem_sample_size": sample})


def joint(settings, hp, plugins, evaluator) -> Built:
    from avalanche.training import JointTraining

    model = _plain_model(settings)
    strategy = JointTraining(**_common(model, settings, plugins, evaluator))
    return Built(strategy, model, {"description": "all tasks' data at once, same epochs (upper bound)"})


def hat(settings, hp, plugins, evaluator) -> Built:
    from avalanche_hat import HAT, HATConfig, HATMultiTaskModel
    from avalanche_hat.training import HATClassIncrementalModel

    cfg = HATConfig(num_tasks=settings.num_tasks, max_mask_scale=hp.hat_max_mask_scale)
    backbone = build_trunk(settings.network, in_chans=settings.in_chans, img_size=settings.img_size,
                           width=settings.width, hat_config=cfg)
    config = {"description": "avalanche_hat.HAT (the HAT-CL paper's dense init and cosine mask scale, layerwise usage penalty)",
              "hat_reg_coef": hp.hat_reg_coef, "hat_quota": hp.hat_quota, "hat_max_mask_scale": hp.hat_max_mask_scale,
              "hat_schedule": hp.hat_schedule, "hat_scale_unit": hp.hat_scale_unit}
    if settings.class_incremental:
        # Statistics of every score are kept, so that the report compares them on one trained model.
        model = HATClassIncrementalModel(backbone, num_classes=settings.num_tasks * settings.classes_per_task,
                                         classes_per_task=settings.classes_per_task, hat_config=cfg,
                                         task_score=hp.hat_task_score, reject_head=hp.hat_reject_head,
                                         feature_statistics=True)
        config["description"] += ("; class-incremental: HATClassIncrementalModel, experience i = task i, task "
                                  "predicted at test time")
        config.update(hat_task_score=hp.hat_task_score, hat_reject_head=hp.hat_reject_head,
                      hat_calibration_fraction=model.calibration_fraction,
                      hat_covariance_shrinkage=model.covariance_shrinkage,
                      hat_task_temperature=model.task_temperature,
                      hat_negatives=list(model.negatives) if model.reject_head else [])
    else:
        model = HATMultiTaskModel(backbone, num_classes=settings.classes_per_task, hat_config=cfg)
    kwargs = _common(model, settings, plugins, evaluator)
    if hp.hat_embedding_lr is not None:
        from avalanche_hat import hat_param_groups

        kwargs["optimizer"] = make_optimizer(hat_param_groups(model, embedding_lr=hp.hat_embedding_lr), settings)
    config["hat_embedding_lr"] = hp.hat_embedding_lr
    strategy = HAT(reg_coef=hp.hat_reg_coef, quota=hp.hat_quota, schedule=hp.hat_schedule,
                   scale_unit=hp.hat_scale_unit, **kwargs)
    return Built(strategy, model, config)


BUILDERS: dict[str, Callable[..., Built]] = {
    "HAT": hat, "Naive": naive, "EWC": ewc, "SI": si, "LwF": lwf, "PackNet": packnet, "Replay": replay,
    "ER-ACE": er_ace, "A-GEM": agem, "JointTraining": joint,
}


def resolve_methods(names, scenario: str = "task") -> list[str]:
    """Method names from user input (case-insensitive; ``all``: the scenario's methods; ``joint``
    for JointTraining)."""
    methods = CLASS_METHODS if scenario == "class" else METHODS
    if not names or names == ["all"]:
        return list(methods)
    lookup = {m.lower(): m for m in (*METHODS, *CLASS_METHODS)}
    lookup["joint"] = "JointTraining"
    lookup["er_ace"] = lookup["erace"] = "ER-ACE"
    lookup["agem"] = lookup["a_gem"] = "A-GEM"
    out = []
    for name in names:
        for part in str(name).split(","):
            part = part.strip()
            if not part:
                continue
            if part.lower() not in lookup:
                raise ValueError(f"unknown method {part!r}: choose from {', '.join(methods)} (or 'all')")
            if lookup[part.lower()] not in out:
                out.append(lookup[part.lower()])
    return out
