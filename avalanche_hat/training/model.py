"""HATMultiTaskModel: a HAT network as an Avalanche ``MultiTaskModule`` with one head per task."""
from __future__ import annotations

import numbers

import torch
from avalanche.models import DynamicModule, MultiTaskModule
from torch import nn

from ..config import HATConfig
from ..modules import HATModule, TaskIndexedLinear, TaskIndexedModule
from ..network import hat_modules
from ..payload import HATPayload


def network_hat_config(model: nn.Module) -> HATConfig:
    """The HATConfig the HAT layers of ``model`` share (a clear error if there are none or they differ)."""
    configs = {id(layer.hat_config): layer.hat_config for _, layer in hat_modules(model)}
    if not configs:
        raise ValueError(
            f"{type(model).__name__} has no HAT layers (HATLinear, HATConv2d, ...): HAT can only protect "
            "tasks in a network built from them, e.g. timm.create_model('hat_resnet18s', hat_config=...) "
            "after `import avalanche_hat.timm_models`, or a network of avalanche_hat.modules layers"
        )
    num_tasks = {c.num_tasks for c in configs.values()}
    if len(num_tasks) > 1:
        raise ValueError(f"the HAT layers of {type(model).__name__} disagree on num_tasks: {sorted(num_tasks)}")
    return next(iter(configs.values()))


def check_no_lazy_modules(model: nn.Module) -> None:
    """Refuse Avalanche dynamic modules (MultiHeadClassifier, IncrementalClassifier, ...) below the root:
    they add parameters when a new task or class shows up, so DDP, optimizers and checkpoints would
    not see one fixed set of parameters, and a head created at evaluation would be untrained."""
    for name, module in model.named_modules():
        if name and isinstance(module, DynamicModule):
            raise ValueError(
                f"{name} is an Avalanche {type(module).__name__}, which creates heads lazily when a new "
                "task shows up. With HAT every head and mask embedding exists before training: use "
                "avalanche_hat.modules.TaskIndexedLinear(in_features, num_classes, hat_config) as the "
                "per-task head, or let HATMultiTaskModel(backbone, num_classes=...) add it"
            )


_NO_TASK_LABELS = object()


def backbone_hat_config(backbone: nn.Module, hat_config: HATConfig | None) -> HATConfig:
    """The HATConfig of a backbone wrapped into a multi-task model: ``hat_config`` if given (it must
    match the backbone's HAT layers), else the backbone's own. Refuses lazily growing modules."""
    found = network_hat_config(backbone)
    if hat_config is None:
        hat_config = getattr(backbone, "hat_config", None) or found
    if not isinstance(hat_config, HATConfig):
        raise TypeError(f"hat_config must be a HATConfig, got {type(hat_config).__name__}")
    if hat_config.num_tasks != found.num_tasks:
        raise ValueError(
            f"hat_config has num_tasks={hat_config.num_tasks} but the backbone's HAT layers were built "
            f"for {found.num_tasks}: pass the config the backbone was built with (or omit hat_config)"
        )
    check_no_lazy_modules(backbone)
    return hat_config


def backbone_num_features(backbone, num_features: int | None = None) -> int:
    """The width of the backbone's output: ``num_features`` if given, else its ``num_features`` attribute."""
    if num_features is None:
        num_features = getattr(backbone, "num_features", None)
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(
            f"cannot tell the output width of {type(backbone).__name__}: pass num_features= "
            "(or give the backbone a num_features attribute)"
        )
    return num_features


def _integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def as_task_id(task_label, what: str = "task label") -> int:
    """``task_label`` as an int task id: an int, a numpy integer or a one-element integer tensor.
    Floats (and bools) are refused: ``int(1.5)`` would silently run task 1."""
    if isinstance(task_label, torch.Tensor):
        if task_label.numel() != 1:
            raise ValueError(f"a {what} is one task id, got a tensor of shape {tuple(task_label.shape)}")
        if not _integer_dtype(task_label.dtype):
            raise TypeError(_float_task_labels_message(what, task_label.dtype, task_label.flatten()))
        return int(task_label.item())
    if isinstance(task_label, bool) or not isinstance(task_label, numbers.Integral):
        raise TypeError(_float_task_labels_message(what, type(task_label).__name__, [task_label]))
    return int(task_label)


def _float_task_labels_message(what: str, kind, values) -> str:
    """What is wrong with non-integer task labels and what to do; ``values`` a tensor or a list."""
    fractional = []
    if isinstance(values, torch.Tensor) and values.dtype.is_floating_point:
        fractional = torch.unique(values[values != values.round()]).tolist()[:5]
    elif not isinstance(values, torch.Tensor):
        fractional = [v for v in values if isinstance(v, float) and v != round(v)][:5]
    return (
        f"{what}s must be integer task ids, got {kind}"
        + (f" with fractional values {fractional}" if fractional else "")
        + ": a task id picks the task's masks and head, and int() would truncate it (1.5 would run task 1). "
        "Pass integer task ids (a torch.long tensor or Python ints; labels.long() if they are whole numbers)"
    )


def check_task_in_range(hat_config, task_label, what: str = "task label") -> int:
    """``task_label`` as an int task id (integers only, see :func:`as_task_id`), or a clear error if
    the HAT model has no task of that index."""
    task = as_task_id(task_label, what)
    if not 0 <= task < hat_config.num_tasks:
        raise ValueError(
            f"{what} {task} is outside the {hat_config.num_tasks} tasks this HAT model was built for "
            f"(task ids 0..{hat_config.num_tasks - 1}): build the network with HATConfig(num_tasks=...) "
            f"at least as large as the number of {what.split()[0]}s in the stream"
        )
    return task


class HATMultiTaskModel(MultiTaskModule):
    """A HAT network as an Avalanche multi-task model (task-incremental learning, one head per task).

    Args:
        backbone: a network of HAT layers whose forward takes a :class:`HATPayload` and returns a
            tensor or a payload; for example ``timm.create_model('hat_resnet18s', hat_config=cfg,
            num_classes=N)`` (logits from its own per-task head) or with ``num_classes=0`` (features).
        num_classes: classes per task. Given, a per-task head ``TaskIndexedLinear(num_features,
            num_classes)`` is created here for every task at once; leave it None when the backbone
            already ends in per-task heads (it must then say so with ``backbone.num_classes > 0``).
        hat_config: the backbone's HATConfig (found in its layers when omitted).
        num_features: width of the backbone's output; defaults to ``backbone.num_features``.

    ``mask_scale`` is the scale ``s`` of the soft masks used while training; the :class:`HATPlugin`
    sets it every iteration. In eval mode, or while it is None, the masks are binary (inference).
    ``forward(x, task_labels)`` splits a mixed-task minibatch by task and returns logits. Task labels
    must be integers (a float label is refused, never truncated).

    ``train_task`` is the task the :class:`HATPlugin` trains in the current ``strategy.train`` call
    (None otherwise). While it is set, a training-mode forward of any other task is refused: replay,
    A-GEM's memory or LwF's distillation would train that task's head and norm statistics, which
    HAT protects (evaluation, in eval mode, may run every task).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        hat_config: HATConfig | None = None,
        *,
        num_features: int | None = None,
    ) -> None:
        super().__init__()
        hat_config = backbone_hat_config(backbone, hat_config)
        self.backbone = backbone
        self.hat_config = hat_config
        self.mask_scale: float | None = None
        self.train_task: int | None = None  # set by the HATPlugin while it trains a task

        backbone_classes = getattr(backbone, "num_classes", None) or 0
        if num_classes is None:
            if backbone_classes <= 0:
                raise ValueError(
                    f"{type(backbone).__name__} returns features, not per-task logits: pass num_classes "
                    "(classes per task) so that a per-task head is created for every task"
                )
            self.head = None
            self.num_classes = int(backbone_classes)
        else:
            if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
                raise ValueError(f"num_classes must be a positive int (classes per task), got {num_classes!r}")
            if backbone_classes > 0:
                raise ValueError(
                    f"{type(backbone).__name__} already ends in a {backbone_classes}-class head: create it "
                    "with num_classes=0 to add a HAT head here, or pass num_classes=None to use its own"
                )
            num_features = backbone_num_features(backbone, num_features)
            like = next(backbone.parameters())  # the head starts where the backbone is
            self.head = TaskIndexedLinear(num_features, num_classes, hat_config, device=like.device, dtype=like.dtype)
            self.num_classes = num_classes
        self.num_features = num_features

    # ------------------------------------------------------------------------------ checks
    def check_task_label(self, task_label: int) -> int:
        return check_task_in_range(self.hat_config, task_label)

    def adaptation(self, experience) -> None:
        """Avalanche's model adaptation: nothing is created (every head exists already); task labels
        outside the model are refused here, before any training step. The bookkeeping of
        MultiTaskModule (known tasks, largest class) is kept, for experiences that carry it."""
        task_labels = list(getattr(experience, "task_labels", []))
        for task in task_labels:
            self.check_task_label(task)
        classes = getattr(experience, "classes_in_this_experience", None)
        if classes:
            self.max_class_label = max(self.max_class_label, max(classes) + 1)
        if self.training:
            self.known_train_tasks_labels = self.known_train_tasks_labels | set(task_labels)

    # ----------------------------------------------------------------------------- forward
    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        task = self.check_task_label(task_label)
        if self.training:
            self._check_training_task(task)
        scale = self.mask_scale if self.training else None
        out = self.backbone(HATPayload(x, task_id=task, mask_scale=scale))
        if self.head is not None:
            return self.head(out, task)
        return out.data if isinstance(out, HATPayload) else out

    def _check_training_task(self, task: int) -> None:
        """Refuse a training-mode forward of a task other than the one being trained (``train_task``)."""
        training = getattr(self, "train_task", None)  # None also for models pickled before it existed
        if training is None or task == training:
            return
        raise RuntimeError(
            f"HATMultiTaskModel is training task {training}, and a training-mode forward asked for task "
            f"{task}: it would train task {task}'s head and normalisation statistics, which HAT protects. "
            "A plugin forwards other tasks' samples while training: replay (ReplayPlugin and other "
            "memory-based plugins), A-GEM/GEM (their episodic memory) or LwF (distillation through every "
            "learned task's head). HAT needs no replay: its masks keep every learned task exactly "
            "(bit-identical outputs), so replay, gradient projection or distillation buy nothing and would "
            "change the tasks already learned. Remove that plugin (to evaluate other tasks, call "
            "model.eval() first)."
        )

    def forward(self, x: torch.Tensor, task_labels=_NO_TASK_LABELS) -> torch.Tensor:
        """Logits for a minibatch whose samples may belong to different tasks (``task_labels``: an int
        or one label per sample; None gives Avalanche's ``forward_all_tasks`` dict)."""
        if task_labels is _NO_TASK_LABELS:
            raise TypeError(
                "HATMultiTaskModel needs the task labels: model(x, task_labels). HAT needs task ids; "
                "Avalanche passes them for experiences that have task labels (return_task_id=True, "
                "or a stream wrapped with avalanche.benchmarks.scenarios.task_aware.with_task_labels)"
            )
        if task_labels is None:
            return self.forward_all_tasks(x)
        if not isinstance(task_labels, (torch.Tensor, list, tuple)) and not hasattr(task_labels, "__array__"):
            return self.forward_single_task(x, as_task_id(task_labels))
        task_labels = torch.as_tensor(task_labels, device=x.device)
        if not _integer_dtype(task_labels.dtype):
            raise TypeError(_float_task_labels_message("task label", f"a {task_labels.dtype} tensor", task_labels))
        tasks = torch.unique(task_labels)
        if tasks.numel() == 1:
            return self.forward_single_task(x, int(tasks.item()))
        out = None
        for task in tasks.tolist():
            select = task_labels == task
            logits = self.forward_single_task(x[select], task)
            if out is None:
                out = logits.new_zeros((x.shape[0], *logits.shape[1:]))
            out[select] = logits
        return out

    def extra_repr(self) -> str:
        return f"num_tasks={self.hat_config.num_tasks}, num_classes={self.num_classes}, mask_scale={self.mask_scale}"


# ------------------------------------------------------------------------ plain trainable parts
def _is_protected_module(module: nn.Module) -> bool:
    """HAT layers (ownership per unit) and task-indexed modules (one copy per task)."""
    return isinstance(module, (HATModule, TaskIndexedModule))


def plain_trainable_parts(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(parameters, norms)``: the names of the trainable parameters outside HAT layers and
    task-indexed modules, and of the plain norms with running statistics (BatchNorm, InstanceNorm
    with ``track_running_stats``) outside them. HAT protects neither: every task trains them."""
    protected: set[int] = set()
    plain_norms = []
    for name, module in model.named_modules():
        if _is_protected_module(module):
            protected.update(id(m) for m in module.modules())
        elif id(module) not in protected and isinstance(module, nn.modules.batchnorm._NormBase):
            if module.track_running_stats:
                plain_norms.append(name)
    owned = {id(p) for m in model.modules() if id(m) in protected for p in m.parameters(recurse=False)}
    parameters = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    return parameters, plain_norms
