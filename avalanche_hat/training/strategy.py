"""HAT: the Avalanche strategy (a ``SupervisedTemplate`` with the HATPlugin), like EWC or PackNet."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from avalanche.core import BasePlugin
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
from avalanche.models import MultiTaskModule
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.plugins.evaluation import default_loggers
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn import CrossEntropyLoss
from torch.optim import Optimizer

from ..config import HATConfig
from ..mechanism.schedules import MaskScaleSchedule
from ..network import trained_tasks
from .checkpoint import make_optimizers_picklable
from .distributed import DistributedHATPlugin, is_distributed, local_device
from .metrics import hat_capacity_metrics
from .model import HATMultiTaskModel, check_no_lazy_modules
from .plugin import DEFAULT_REG_COEF, HATPlugin, check_hat_model, check_optimizer, drop_revisit_wrapper, unwrap_model


def default_hat_evaluator() -> EvaluationPlugin:
    """Accuracy and loss (epoch, experience, stream), forgetting (experience, stream) and the HAT
    capacity metric, shown by Avalanche's InteractiveLogger."""
    return EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True, experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        hat_capacity_metrics(per_layer=False),
        loggers=default_loggers,
    )


def as_hat_model(
    model: nn.Module,
    num_classes: int | None = None,
    hat_config: HATConfig | None = None,
) -> MultiTaskModule:
    """``model`` as a HAT multi-task model: a HAT-aware MultiTaskModule as it is, a plain HAT network
    wrapped in :class:`HATMultiTaskModel` (with one head per task if it returns features)."""
    inner = unwrap_model(model)
    if isinstance(inner, MultiTaskModule):
        if num_classes is not None and not isinstance(inner, HATMultiTaskModel):
            raise ValueError(
                f"{type(inner).__name__} is already a multi-task model with its own heads: drop num_classes"
            )
        if isinstance(inner, HATMultiTaskModel) and num_classes not in (None, inner.num_classes):
            raise ValueError(
                f"the model has {inner.num_classes} classes per task but num_classes={num_classes} was given"
            )
        check_hat_model(model)
        check_no_lazy_modules(inner)
        return model
    if inner is not model:
        raise ValueError(
            "the network is wrapped in DistributedDataParallel before it has its per-task heads: pass "
            "the plain network; under torchrun the HAT strategy wraps the whole model (heads included) "
            "in DistributedDataParallel itself"
        )
    return HATMultiTaskModel(model, num_classes=num_classes, hat_config=hat_config)


def _add_new_parameters(optimizer: Optimizer, model: nn.Module) -> None:
    """Put the parameters the wrapper created (the heads) into the user's optimizer now, so that it
    holds one fixed set of parameters from the start (Avalanche would add them at the first
    experience, and fails to place them when the optimizer has several param groups)."""
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [p for p in model.parameters() if id(p) not in known]
    if not new:
        return
    if len(optimizer.param_groups) == 1:
        optimizer.param_groups[0]["params"].extend(new)
    else:
        optimizer.add_param_group({"params": new})


class HAT(SupervisedTemplate):
    """Hard Attention to the Task (Serrà et al., ICML 2018; HAT-CL).

    Task-incremental learning with zero forgetting: each task learns a binary mask over the units of
    every HAT layer, and the weights of units earlier tasks use are never changed again. The model is
    a HAT network (for example ``timm.create_model('hat_resnet18s', hat_config=HATConfig(num_tasks=5),
    num_classes=0)`` after ``import avalanche_hat.timm_models``), turned into a multi-head model here,
    or a HAT-aware Avalanche MultiTaskModule (see :class:`HATMultiTaskModel`). Every head and mask
    embedding exists before training. The stream must carry task labels (``return_task_id=True``).

    :param model: the HAT network or HAT multi-task model, or any plain model, which is converted
        with :func:`avalanche_hat.convert` (``hat_config`` is then required; ``num_classes``, if given,
        is the width of the per-task heads that replace its classifier; pretrained weights are every
        task's starting point). The optimizer, made for the plain model's parameters in one group,
        is pointed at the converted network's.
    :param optimizer: any torch optimizer without weight decay; its state is reset per experience.
    :param criterion: the loss (cross entropy).
    :param num_classes: classes per task when the network returns features: a per-task head of that
        width is added. Leave None if the model already has per-task heads.
    :param hat_config: the network's HATConfig (found in its layers when omitted).
    :param reg_coef, regularization, quota, schedule, max_mask_scale, scale_unit, weight_decay,
        allow_task_revisit, check_finite, plain_parameters: see :class:`HATPlugin`.
    :param distributed: data-parallel training under ``torchrun`` (see
        :mod:`avalanche_hat.training.distributed`). ``None`` (default): whenever the process belongs
        to a ``torch.distributed`` process group (``init_distributed()``), otherwise nothing changes;
        ``True``: the same, and an error without a process group; ``False``: never; or a
        :class:`DistributedHATPlugin` with its options. ``train_mb_size`` is then per process.
    :param train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator, eval_every:
        as for every Avalanche strategy; ``plugins`` are kept (the HATPlugin is added to a copy of the
        list). The default evaluator adds the HAT capacity metric to accuracy, loss and forgetting.
        ``device`` defaults to this process's device (``cuda:LOCAL_RANK`` under NCCL, else the CPU).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        criterion=CrossEntropyLoss(),
        num_classes: Optional[int] = None,
        hat_config: Optional[HATConfig] = None,
        reg_coef: float = DEFAULT_REG_COEF,
        regularization: str = "layerwise",
        quota: Optional[float] = None,
        schedule: Union[str, MaskScaleSchedule] = "cosine",
        max_mask_scale: Optional[float] = None,
        scale_unit: Union[str, int] = "epoch",
        weight_decay: float = 0.0,
        allow_task_revisit: bool = False,
        check_finite: bool = True,
        plain_parameters: str = "refuse",
        distributed: Union[bool, None, DistributedHATPlugin] = None,
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        plugins: Optional[Sequence[BasePlugin]] = None,
        evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_hat_evaluator,
        eval_every: int = -1,
        **base_kwargs,
    ) -> None:
        check_optimizer(optimizer)
        model, num_classes = _convert_plain_model(model, optimizer, num_classes, hat_config)
        model = as_hat_model(model, num_classes=num_classes, hat_config=hat_config)
        _add_new_parameters(optimizer, model)
        self.hat_plugin = HATPlugin(
            reg_coef=reg_coef,
            regularization=regularization,
            quota=quota,
            schedule=schedule,
            max_mask_scale=max_mask_scale,
            scale_unit=scale_unit,
            weight_decay=weight_decay,
            allow_task_revisit=allow_task_revisit,
            check_finite=check_finite,
            plain_parameters=plain_parameters,
        )
        self.distributed_plugin = _distributed_plugin(distributed)
        plugins = [*(plugins or []), self.hat_plugin]
        if self.distributed_plugin is not None:
            plugins.append(self.distributed_plugin)  # last: its metric gathering feeds the evaluator
        if device is None:
            device = local_device() if is_distributed() else "cpu"
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
            eval_every=eval_every,
            **base_kwargs,
        )

    def train(self, *args, **kwargs):
        # A forward that raises (an interrupt, a bad minibatch) never reaches after_forward: the
        # blocks the plugin opened for it are closed here.
        try:
            return super().train(*args, **kwargs)
        finally:
            self.hat_plugin.close_forward_blocks()

    # Before anything runs on an experience (BatchNorm statistics included): class labels beyond the
    # per-task heads would otherwise fail inside cross entropy ("IndexError: Target 2 is out of bounds").
    def _before_training_exp(self, **kwargs):
        check_labels_fit_the_heads(self.experience, self.model)
        super()._before_training_exp(**kwargs)

    def _before_eval_exp(self, **kwargs):
        check_labels_fit_the_heads(self.experience, self.model)
        super()._before_eval_exp(**kwargs)

    @property
    def trained_tasks(self) -> list[int]:
        """The task ids learned so far (protected from now on)."""
        return trained_tasks(unwrap_model(self.model))

    def __getstate__(self):
        # Avalanche's save_checkpoint pickles the strategy with dill: see .checkpoint.
        make_optimizers_picklable()
        state = self.__dict__.copy()
        # A DDP wrapper belongs to its process group: checkpoints hold the model itself, which loads
        # in one process or in a distributed run (wrapped again when training starts).
        state["model"] = unwrap_model(state["model"])
        drop_revisit_wrapper(state)  # allow_task_revisit's per-experience wrapper is not saved
        return state


def check_labels_fit_the_heads(experience, model: nn.Module) -> None:
    """Raise a clear error when the experience's class labels do not fit the per-task heads of a
    :class:`HATMultiTaskModel` (the usual cause: a task-incremental benchmark whose class ids do not
    restart at 0 in each task)."""
    inner = unwrap_model(model)
    classes = getattr(experience, "classes_in_this_experience", None)
    if not isinstance(inner, HATMultiTaskModel) or not classes:
        return
    width, low, high = inner.num_classes, min(int(c) for c in classes), max(int(c) for c in classes)
    if low >= 0 and high < width:
        return
    raise ValueError(
        f"experience {getattr(experience, 'current_experience', '?')} has class labels {low}..{high}, but the "
        f"model gives {width} outputs per task: HAT has one head per task, whose classes are numbered from 0. "
        "Number each task's classes from 0 (nc_benchmark(..., task_labels=True, "
        "class_ids_from_zero_in_each_exp=True); the classic benchmarks do it with return_task_id=True), "
        f"or make every head wider (num_classes={high + 1})"
    )


def _convert_plain_model(model: nn.Module, optimizer: Optimizer, num_classes, hat_config):
    """A plain model (no HAT layer) converted with :func:`avalanche_hat.convert` (its weights are every
    task's starting point; ``num_classes`` sets the per-task heads' width), and the optimizer pointed
    at the converted network's parameters. A HAT network or HAT multi-task model passes as it is."""
    from ..converter import convert, has_no_classifier
    from ..network import hat_modules

    inner = unwrap_model(model)
    if isinstance(inner, MultiTaskModule) or any(True for _ in hat_modules(inner)):
        return model, num_classes
    if inner is not model:
        raise ValueError("pass the plain model, not a DistributedDataParallel wrapper: HAT converts it first")
    if hat_config is None:
        raise ValueError(
            f"{type(model).__name__} has no HAT layers: HAT converts it (avalanche_hat.convert) and needs "
            "hat_config=HATConfig(num_tasks=...) for that"
        )
    own = [p for p in model.parameters()]
    given = [p for group in optimizer.param_groups for p in group["params"]]
    if len(optimizer.param_groups) != 1 or {id(p) for p in given} != {id(p) for p in own}:
        raise ValueError(
            "HAT converts the plain model into a new network, so the optimizer must be made for all of the "
            "model's parameters in one parameter group (it is pointed at the converted network's "
            "parameters); or convert first: net = avalanche_hat.convert(model, hat_config) and build the "
            "optimizer on net.parameters()"
        )
    features_only = num_classes is not None and has_no_classifier(model)  # timm's num_classes=0
    net = convert(model, hat_config, heads=() if features_only else num_classes)
    optimizer.param_groups[0]["params"] = list(net.parameters())
    optimizer.state.clear()
    return net, (num_classes if features_only else None)  # features: HATMultiTaskModel adds the heads


def _distributed_plugin(distributed) -> Optional[DistributedHATPlugin]:
    if isinstance(distributed, DistributedHATPlugin):
        return distributed
    if distributed is None:
        return DistributedHATPlugin()  # inert in a single process
    if distributed is True:
        return DistributedHATPlugin(required=True)
    if distributed is False:
        return None
    raise TypeError(f"distributed must be None, True, False or a DistributedHATPlugin, got {distributed!r}")
