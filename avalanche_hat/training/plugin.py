"""HATPlugin: Hard Attention to the Task inside Avalanche's training loop."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from avalanche.benchmarks.scenarios.online import OnlineCLExperience
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..mechanism.schedules import MaskScaleSchedule, make_schedule
from ..modules import HATModule, TaskIndexedLinear
from ..network import clamp_embeddings_, hat_regularization, mark_task_trained, recorded_masks, trained_tasks
from ..opt_ins import retraining
from ..payload import check_network_output, watch_masked_outputs
from .checkpoint import make_optimizers_picklable
from .class_incremental import transformed_negatives
from .model import HATMultiTaskModel, network_hat_config, plain_trainable_parts

#: Coefficient of the mask-usage penalty: ``c = 0.75`` of the original HAT paper.
DEFAULT_REG_COEF = 0.75
SCALE_UNITS = ("epoch", "experience")
REGULARIZATIONS = ("layerwise", "global", "hatcl")
PLAIN_PARAMETERS = ("refuse", "freeze")

_REPLAY = "trains on stored samples of earlier experiences (replay)"
#: Avalanche plugins (and the strategies that add them) that HAT refuses, with what they do. Each
#: would train what the tasks already learned use: their heads, units or normalisation statistics.
INCOMPATIBLE_PLUGINS = {
    "ReplayPlugin": _REPLAY, "GenerativeReplayPlugin": _REPLAY, "GDumbPlugin": _REPLAY,
    "GSS_greedyPlugin": _REPLAY, "MIRPlugin": _REPLAY, "RARPlugin": _REPLAY, "BiCPlugin": _REPLAY,
    "CoPEPlugin": _REPLAY,
    "AGEMPlugin": "forwards stored samples of earlier tasks in training mode and projects the gradient "
                  "with theirs (episodic memory)",
    "GEMPlugin": "forwards stored samples of earlier tasks in training mode and projects the gradient "
                 "with theirs (episodic memory)",
    "LwFPlugin": "forwards every learned task's head in training mode for its distillation loss",
    "FromScratchTrainingPlugin": "re-initialises the whole model before each experience",
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def check_hat_model(model: nn.Module) -> nn.Module:
    """Raise a clear error unless ``model`` is a multi-task model of HAT layers that takes a mask scale."""
    model = unwrap_model(model)
    network_hat_config(model)  # has HAT layers
    if not isinstance(model, MultiTaskModule):
        raise TypeError(
            f"{type(model).__name__} is not an Avalanche MultiTaskModule, so the strategy would call it "
            "without task labels: wrap it with avalanche_hat.HATMultiTaskModel(net, num_classes=...) "
            "(the HAT strategy does this for you)"
        )
    if not hasattr(model, "mask_scale"):
        raise TypeError(
            f"{type(model).__name__} has no `mask_scale` attribute: a HAT-aware MultiTaskModule sets "
            "self.mask_scale = None in __init__ and builds HATPayload(x, task_id=t, "
            "mask_scale=self.mask_scale) in forward_single_task; or use avalanche_hat.HATMultiTaskModel"
        )
    return model


def check_optimizer(optimizer) -> None:
    """Refuse an optimizer whose steps HAT cannot see: one that is not a ``torch.optim.Optimizer``.

    HAT keeps what the tasks already learned own bit-identical by construction: Eq. 2 zeroes their
    gradients, and after every ``torch.optim.Optimizer`` step (subclasses and the inner optimizers
    of a wrapper included) a global hook copies the owned entries back from a reference
    (:mod:`avalanche_hat.guard`). So momentum or Adam moments from earlier tasks, weight decay
    (SGD's, Adam's, AdamW's decoupled one, ASGD's built-in one) and state kept in inner optimizers
    cannot move them, and any ``torch.optim`` optimizer is safe. An object that is not a
    ``torch.optim.Optimizer`` runs no hook: its updates would be caught only at the next forward,
    and not at all if it writes through ``.data``, so the strategy refuses it.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return
    inner = [o for o in vars(optimizer).values() if isinstance(o, torch.optim.Optimizer)] \
        if hasattr(optimizer, "__dict__") else []
    raise TypeError(
        f"{type(optimizer).__name__} is not a torch.optim.Optimizer: HAT keeps the tasks already learned "
        "bit-identical by restoring what they own after every torch.optim.Optimizer step (a hook that "
        f"{type(optimizer).__name__}'s step does not run), so its updates could move their weights. "
        + ("Pass its inner torch.optim optimizer(s) instead, or " if inner else "")
        + "Subclass torch.optim.Optimizer (a wrapper may keep inner optimizers: their steps run the hook) "
        "or use a torch.optim optimizer."
    )


def check_plugins(plugins) -> None:
    """Refuse the Avalanche plugins that replay, project gradients on earlier tasks' samples or
    distil through earlier tasks' heads (:data:`INCOMPATIBLE_PLUGINS`, subclasses included)."""
    for plugin in plugins:
        for cls in type(plugin).__mro__:
            reason = INCOMPATIBLE_PLUGINS.get(cls.__name__)
            if reason is not None and cls.__module__.startswith("avalanche."):
                raise ValueError(
                    f"{type(plugin).__name__} {reason}: HAT needs no replay. Its masks keep every task "
                    "it has learned exactly (bit-identical outputs), so replay, gradient projection or "
                    "distillation buy nothing, and this plugin would train the heads, units or "
                    "normalisation statistics of the tasks already learned. Remove it from the plugins "
                    "(or train with a strategy other than LwF, AGEM, GEM, Replay, ...); regularisers such as "
                    "EWC or SI may stay, they only add a penalty to the current task's loss."
                )


def plain_parts_message(model: nn.Module, parameters: list[str], norms: list[str]) -> str:
    """What is wrong with a model that has plain trainable parts, and what to do."""
    found = []
    if parameters:
        found.append(f"parameters {parameters[:10]}" + (f" and {len(parameters) - 10} more" if len(parameters) > 10 else ""))
    if norms:
        found.append(f"norms with running statistics {norms[:10]}" + (f" and {len(norms) - 10} more" if len(norms) > 10 else ""))
    return (
        f"{type(model).__name__} has trainable parts outside HAT layers and task-indexed modules: "
        f"{'; '.join(found)}. HAT protects neither, so every later task would train them and change "
        "what the tasks already learned compute. Replace them with their avalanche_hat.modules "
        "versions (TaskIndexedBatchNorm1d/2d/3d, TaskIndexedLayerNorm, TaskIndexedLinear for heads, "
        "TaskIndexedParameter, HAT layers such as HATLinear/HATConv2d; avalanche_hat.modules."
        "from_base_module converts one), fix pretrained parameters yourself (requires_grad_(False)), "
        "or pass plain_parameters=\"freeze\" to HAT(...) / HATPlugin(...): they are then trained with "
        "the first task and frozen after it (no gradient, no optimizer step, norms keep the first "
        "task's running statistics), which later tasks must make do with."
    )


class HATPlugin(SupervisedPlugin, supports_distributed=True):
    """Hard Attention to the Task (Serrà et al., 2018; HAT-CL) as an Avalanche plugin.

    In the training loop it

    - checks that each experience is one task the model has not learned yet (HAT needs task ids:
      a class-incremental stream, whose experiences all carry task label 0, is refused unless the
      model is a :class:`~avalanche_hat.training.HATClassIncrementalModel`, see below);
    - accepts any ``torch.optim.Optimizer`` (weight decay, momentum, Adam, ASGD, wrappers with
      inner optimizers): after every optimizer step what the learned tasks own is restored
      bit-identical (:mod:`avalanche_hat.guard`); other optimizer objects are refused
      (``check_optimizer``). The optimizer state is still reset at each experience (a new task
      starts without the previous one's momentum), but protection no longer depends on it;
    - refuses plugins that replay or forward earlier tasks in training mode (``check_plugins``:
      Replay, A-GEM, GEM, LwF, ...; HAT needs no replay), and any training minibatch that carries
      samples of a task other than the experience's;
    - refuses trainable parts HAT cannot protect (plain parameters and norms outside HAT layers and
      task-indexed modules), or freezes them after the first task (``plain_parameters="freeze"``);
    - sets the model's ``mask_scale`` every iteration from a schedule (the cosine one the HAT-CL
      paper proposes, Eq. 6, by default; the original linear one, also HAT-CL 0.1.1's default,
      with ``schedule="linear"``), over a unit of training that is an epoch
      by default; evaluation uses binary masks;
    - adds ``reg_coef * hat_regularization(...)`` to the loss (``before_backward``);
    - marks the task trained at the end of the experience (``mark_task_trained``), which protects
      its units from then on.

    Class-incremental mode (on when the model is a ``HATClassIncrementalModel``, or with
    ``class_incremental=True``): experience ``i`` is HAT task ``i`` whatever its task label, its
    classes are registered with the model, a ``calibration_fraction`` of its training data is held
    out, each minibatch is extended with transformed negatives for the reject logit (with the
    model's ``reject_head``; metrics and the cross entropy see the real samples only), and when the
    task ends the model records its calibration statistics. Nothing of this runs otherwise.

    Args:
        reg_coef: coefficient of the mask-usage penalty (original HAT: 0.75).
        regularization: ``"layerwise"`` (HAT-CL Eq. 5, per layer with a quota), ``"global"``
            (the original ratio over all layers) or ``"hatcl"`` (HAT-CL 0.1.1's ``get_hat_reg_term``,
            to keep a HAT-CL coefficient; see ``hat_regularization``).
        quota: share of each layer's free units a task may use before the layerwise penalty acts
            (default ``1 / num_tasks``).
        schedule: ``"cosine"`` (HAT-CL Eq. 6), ``"linear"`` (original Eq. 4) or a
            :class:`~avalanche_hat.MaskScaleSchedule`.
        max_mask_scale: ``s_max`` for a schedule given by name; defaults to the model's
            ``HATConfig.max_mask_scale``.
        scale_unit: what one period of the schedule spans: ``"epoch"``, ``"experience"``, or a
            number of iterations.
        weight_decay: an L2 penalty that respects ownership: on the weights of HAT layers' output
            units that no earlier task owns and on the current task's head; owned units never
            decay. 0 disables it. (The optimizer's own ``weight_decay`` is safe too: what earlier
            tasks own is restored after each step; this penalty leaves it out of the loss instead.)
        allow_task_revisit: train again on a task id that is already learned (it is then trained
            on its own units and what is free, every other task stays protected; its forwards run
            inside ``avalanche_hat.retraining(task)``, without which a training forward of a trained
            task is refused). Off by default, because a repeated task id usually means a
            class-incremental stream.
        class_incremental: None (default) follows the model (a ``HATClassIncrementalModel`` is
            trained class-incrementally, any other model task-incrementally); True or False insists
            on one mode and refuses a model of the other.
        check_finite: stop training with a ``FloatingPointError`` when the loss is not finite, before
            its backward pass and optimizer step. A diverged step would put nan or inf into the free
            weights of the task being learned, and earlier tasks read those weights with inputs that
            are exactly 0, so ``0 * nan`` would reach their outputs: HAT's guarantee holds for finite
            steps only. On a GPU the check reads one number per iteration from the device. When it
            fires, the error also says whether the model's parameters and buffers are still finite
            (an earlier step with a finite loss may already have overflowed them).
        plain_parameters: what to do with trainable parameters outside HAT layers and task-indexed
            modules (a plain ``nn.BatchNorm2d``, a shared ``nn.Linear`` head, a bare ``nn.Parameter``)
            and with plain norms' running statistics, which HAT cannot protect: ``"refuse"`` (default)
            lists them by name in an error before the first experience trains; ``"freeze"`` trains
            them with the first task and freezes them once a task is learned (their gradients are
            dropped before every optimizer step and plain norms run in eval mode, on the first task's
            running statistics), so that earlier tasks stay bit-identical.
    """

    # Defaults for plugins unpickled from checkpoints written before these options existed.
    plain_parameters = "refuse"
    _frozen_parameters: tuple = ()
    _frozen_norms: tuple = ()
    _retrains = False
    _recording = _watching = None

    def __init__(
        self,
        *,
        reg_coef: float = DEFAULT_REG_COEF,
        regularization: str = "layerwise",
        quota: float | None = None,
        schedule: str | MaskScaleSchedule = "cosine",
        max_mask_scale: float | None = None,
        scale_unit: str | int = "epoch",
        weight_decay: float = 0.0,
        allow_task_revisit: bool = False,
        class_incremental: bool | None = None,
        check_finite: bool = True,
        plain_parameters: str = "refuse",
    ) -> None:
        super().__init__()
        if not reg_coef >= 0:
            raise ValueError(f"reg_coef must be >= 0, got {reg_coef}")
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got {regularization!r}")
        if quota is not None and not 0 <= quota <= 1:
            raise ValueError(f"quota must be in [0, 1] or None, got {quota}")
        if isinstance(scale_unit, bool) or not (
            scale_unit in SCALE_UNITS or (isinstance(scale_unit, int) and scale_unit >= 1)
        ):
            raise ValueError(f"scale_unit must be one of {SCALE_UNITS} or a positive number of iterations, got {scale_unit!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not isinstance(schedule, MaskScaleSchedule):
            make_schedule(schedule, 1.0)  # fail now on an unknown name
        self.reg_coef = float(reg_coef)
        self.regularization = regularization
        self.quota = quota
        self.schedule = schedule
        self.max_mask_scale = max_mask_scale
        self.scale_unit = scale_unit
        self.weight_decay = float(weight_decay)
        self.allow_task_revisit = allow_task_revisit
        if class_incremental not in (None, True, False):
            raise ValueError(f"class_incremental must be None, True or False, got {class_incremental!r}")
        self.class_incremental = class_incremental
        self.check_finite = bool(check_finite)
        if plain_parameters not in PLAIN_PARAMETERS:
            raise ValueError(f"plain_parameters must be one of {PLAIN_PARAMETERS}, got {plain_parameters!r}")
        self.plain_parameters = plain_parameters
        # Frozen plain parts while a later task trains (plain_parameters="freeze"), set per experience.
        self._frozen_parameters: list = []
        self._frozen_norms: list = []
        # Per-experience state, set in before_training_exp.
        self.task_id: int | None = None
        self._open_task: int | None = None  # started and not yet marked trained (online streams)
        self._sub_experiences = 0
        self._schedule: MaskScaleSchedule | None = None
        self._unit_batches = 1
        # Class-incremental state: the mode of the experience, its held-out calibration data, the
        # minibatch before negatives were added and the negatives' logits (one iteration).
        self._class_incremental_exp = False
        self._calibration_data = None
        self._real_batch: list | None = None
        self._negative_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------------- experience
    def before_training_exp(self, strategy, **kwargs) -> None:
        """Check everything first (nothing is touched if one check fails), then reset the optimizer.

        In an online stream with task boundaries, the sub-experiences of one experience are one task:
        the checks and the reset happen at its first sub-experience, the marking after its last."""
        model = check_hat_model(strategy.model)
        check_optimizer(strategy.optimizer)
        check_plugins(strategy.plugins)
        plain_parameters, plain_norms = plain_trainable_parts(model)
        if (plain_parameters or plain_norms) and self.plain_parameters == "refuse":
            raise ValueError(plain_parts_message(model, plain_parameters, plain_norms))
        self._real_batch = self._negative_logits = None
        self.close_forward_blocks()  # blocks a forward that raised in an earlier strategy.train left open
        self._recording = self._masks = None  # the forward's masks, reused by the regulariser
        self._watching = self._watched = None  # the forward's masked outputs, for check_network_output
        self._class_incremental_exp = self._is_class_incremental(model)
        if self._class_incremental_exp:
            starts_task = True
            self.task_id = self._class_incremental_task(strategy, model)
            self._sub_experiences = 0
            self._open_task = None
        else:
            starts_task = _starts_task(strategy.experience)
            if starts_task and self._open_task is not None:
                # The previous online task ended without a sub-experience flagged last.
                mark_task_trained(model, self._open_task)
                self._open_task = None
            self.task_id = self._experience_task(strategy, model, starts_task)
            if starts_task:
                self._sub_experiences = 0
            self._open_task = self.task_id if _online_with_boundaries(strategy.experience) else None
        # allow_task_revisit on a trained task: the strategy's forward runs inside retraining(task).
        self._retrains = self.task_id in trained_tasks(model)
        _unwrap_forward(strategy)
        if self._retrains:
            _wrap_forward(strategy, self.task_id)
        config = network_hat_config(model)
        max_scale = self.max_mask_scale if self.max_mask_scale is not None else config.max_mask_scale
        self._schedule = make_schedule(self.schedule, max_scale)
        per_epoch = max(len(strategy.dataloader), 1)
        if self.scale_unit == "epoch":
            self._unit_batches = per_epoch
        elif self.scale_unit == "experience":
            self._unit_batches = per_epoch * max(strategy.train_epochs, 1)
        else:
            self._unit_batches = int(self.scale_unit)
        if starts_task:
            strategy.optimizer.state = defaultdict(dict)
        # Last: nothing above may fail after the model changed.
        self._freeze_plain_parts(model, plain_parameters, plain_norms)
        if self._class_incremental_exp:
            model.register_task(self.task_id, strategy.experience.classes_in_this_experience)
            model.train_task = self.task_id
        elif isinstance(model, HATMultiTaskModel):
            model.train_task = self.task_id  # training-mode forwards of other tasks are refused

    def _freeze_plain_parts(self, model: nn.Module, parameters: list[str], norms: list[str]) -> None:
        """``plain_parameters="freeze"``: once a task is learned, the plain parameters get no optimizer
        step (their gradients are dropped in ``before_update``) and plain norms run in eval mode."""
        self._frozen_parameters, self._frozen_norms = [], []
        if self.plain_parameters != "freeze":
            return
        named_parameters, named_modules = dict(model.named_parameters()), dict(model.named_modules())
        for n in norms:  # the user chose to share them: HATPayload.forward_by no longer refuses them
            named_modules[n].hat_frozen_after_first_task = True
        if not trained_tasks(model):
            return
        self._frozen_parameters = [named_parameters[n] for n in parameters]
        self._frozen_norms = [named_modules[n] for n in norms]
        for p in self._frozen_parameters:
            p.grad = None
        self._keep_norms_frozen()

    def _keep_norms_frozen(self) -> None:
        for norm in self._frozen_norms:
            norm.eval()

    def after_training(self, strategy, **kwargs) -> None:
        model = unwrap_model(strategy.model)
        if isinstance(model, HATMultiTaskModel):
            model.train_task = None
        self._frozen_parameters, self._frozen_norms = [], []

    def _is_class_incremental(self, model: nn.Module) -> bool:
        """The mode for ``model``: its own (``model.class_incremental``) unless the plugin insists."""
        model_mode = bool(getattr(model, "class_incremental", False))
        if self.class_incremental is None or self.class_incremental == model_mode:
            return model_mode
        if self.class_incremental:
            raise ValueError(
                f"HATPlugin(class_incremental=True) needs a model that predicts the task at test time, not "
                f"a {type(model).__name__}: use avalanche_hat.training.HATClassIncrementalModel(backbone, "
                "num_classes=..., classes_per_task=...)"
            )
        raise ValueError(
            f"HATPlugin(class_incremental=False) trains task-incrementally, but {type(model).__name__} is a "
            "class-incremental model: use HATMultiTaskModel for task-incremental streams"
        )

    def _class_incremental_task(self, strategy, model: nn.Module) -> int:
        """Class-incremental mode: the HAT task of the experience is its index in the stream."""
        experience = strategy.experience
        if isinstance(experience, OnlineCLExperience):
            raise ValueError(
                "class-incremental HAT trains one task per experience and calibrates it when the experience "
                "ends: online streams (split_online_stream) are not supported in this mode"
            )
        task = model.check_task_label(experience.current_experience)
        trained = trained_tasks(model)
        if task in trained and not self.allow_task_revisit:
            raise ValueError(
                f"experience {task} is HAT task {task}, which this model has already learned (trained tasks: "
                f"{trained}): a class-incremental stream is trained once, in order; pass "
                "allow_task_revisit=True to train it again on purpose"
            )
        classes = sorted(int(c) for c in experience.classes_in_this_experience)
        targets = getattr(getattr(strategy, "adapted_dataset", None), "targets", None)
        extra = sorted(set(int(c) for c in getattr(targets, "uniques", classes)) - set(classes))
        if extra:
            raise ValueError(
                f"experience {task} holds classes {classes} but its training data also has classes {extra} "
                "(replay?): HAT learns one task per experience and keeps earlier tasks without replay"
            )
        return task

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        """Class-incremental mode: hold out ``calibration_fraction`` of the experience's training data
        (a seeded draw per experience), to calibrate the task's scores when it ends."""
        self._calibration_data = None
        model = unwrap_model(strategy.model)
        if not self._is_class_incremental(model) or isinstance(strategy.experience, OnlineCLExperience):
            return
        data = strategy.adapted_dataset
        held = int(round(model.calibration_fraction * len(data)))
        if held == 0:
            return
        if held >= len(data):
            raise ValueError(f"experience {strategy.experience.current_experience} has {len(data)} samples: too "
                             f"few to hold out calibration_fraction={model.calibration_fraction}")
        seed = torch.Generator().manual_seed(strategy.experience.current_experience)
        order = torch.randperm(len(data), generator=seed)
        self._calibration_data = data.subset(order[:held].sort().values.tolist())
        strategy.adapted_dataset = data.subset(order[held:].sort().values.tolist())

    def _experience_task(self, strategy, model: nn.Module, starts_task: bool) -> int:
        experience = strategy.experience
        if not hasattr(experience, "task_labels"):
            raise ValueError(
                f"experience {experience.current_experience} has no task labels, so Avalanche would call "
                "the model without them: HAT needs task ids. Use a task-incremental benchmark "
                "(return_task_id=True), and wrap derived streams (e.g. split_online_stream) with "
                "avalanche.benchmarks.scenarios.task_aware.with_task_labels(...)"
            )
        labels = set(experience.task_labels)
        data_labels = getattr(getattr(strategy, "adapted_dataset", None), "targets_task_labels", None)
        if data_labels is not None:
            labels |= set(data_labels.uniques)
        labels = sorted(int(t) for t in labels)
        if len(labels) != 1:
            raise ValueError(
                f"experience {experience.current_experience} mixes task labels {labels}: HAT learns one "
                "task per experience (replay of earlier tasks or joint training do not apply; HAT "
                "needs no replay to keep earlier tasks)"
            )
        task = labels[0]
        if not starts_task:  # the next part of the task in progress (online stream)
            if task != self.task_id:
                raise ValueError(
                    f"a sub-experience of task {self.task_id} carries task label {task}: an online "
                    "stream for HAT must keep one task label per original experience"
                )
            return task
        if self.allow_task_revisit:
            return task
        trained = trained_tasks(model)
        if task in trained or _single_task_label_stream(experience):
            raise ValueError(
                f"experience {experience.current_experience} has task label {task}, "
                + (f"which this HAT model has already learned (trained tasks: {trained}). " if task in trained
                   else "like every other experience of its stream. ")
                + "HAT needs task ids: a class-incremental stream gives every experience task label 0. "
                "Use a task-incremental benchmark (e.g. SplitCIFAR10(..., return_task_id=True)), "
                "learn the stream class-incrementally with task-id prediction at test time "
                "(avalanche_hat.training.HATClassIncrementalModel), or "
                f"pass allow_task_revisit=True to train task {task} again on purpose"
            )
        return task

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.close_forward_blocks()
        self._retrains = False
        _unwrap_forward(strategy)
        model = unwrap_model(strategy.model)
        clamp_embeddings_(model)
        self._sub_experiences += 1
        if self._ends_task(strategy.experience):
            mark_task_trained(model, self.task_id)
            self._open_task = None
        model.mask_scale = None
        if self._class_incremental_exp:
            self._record_task_statistics(strategy, model)

    def _record_task_statistics(self, strategy, model: nn.Module) -> None:
        """Class-incremental mode: the task's feature statistics from its training data and its score
        statistics from the held-out part (binary masks, eval transforms)."""
        model.train_task = None

        def loader(data):
            data = data.eval()
            return DataLoader(data, batch_size=strategy.eval_mb_size, shuffle=False,
                              collate_fn=getattr(data, "collate_fn", None))

        calibration = self._calibration_data
        model.record_task_statistics(self.task_id, loader(strategy.adapted_dataset),
                                     None if calibration is None else loader(calibration))
        self._calibration_data = None

    def _ends_task(self, experience) -> bool:
        """True unless ``experience`` is a sub-experience of an online stream with task boundaries
        that is not its experience's last. Avalanche 0.6.0 flags no sub-experience last when the
        experience size divides the data, so the count of sub-experiences decides as well."""
        if _online_with_boundaries(experience):
            length = getattr(experience, "sub_stream_length", None)
            return bool(experience.is_last_subexp) or (length is not None and self._sub_experiences >= length)
        return True

    # -------------------------------------------------------------------------- iteration
    def before_training_iteration(self, strategy, **kwargs) -> None:
        clock = strategy.clock  # its iteration counters are exact from here to after_update
        batch = clock.train_epoch_iterations if self.scale_unit == "epoch" else clock.train_exp_iterations
        unwrap_model(strategy.model).mask_scale = self._schedule.at(batch, self._unit_batches)
        self._keep_norms_frozen()  # a plugin may have called model.train()

    def before_forward(self, strategy, **kwargs) -> None:
        """Record the masks the forward computes (the regulariser reuses them). Class-incremental
        mode with a reject head: append one transformed negative per sample, labelled with the reject
        output (index ``num_classes``). A minibatch with samples of other tasks is refused."""
        self.close_forward_blocks()  # a forward that raised never reached after_forward
        if not self._class_incremental_exp:
            self._check_minibatch_task(strategy)
        if self.reg_coef:
            self._recording = recorded_masks()
            self._masks = self._recording.__enter__()
        self._watching = watch_masked_outputs()
        self._watched = self._watching.__enter__()
        model = unwrap_model(strategy.model)
        if not (self._class_incremental_exp and model.reject_head and model.reject_coef > 0):
            return
        batch = list(strategy.mbatch)
        x, y = batch[0], batch[1]
        reject = torch.full_like(y, model.num_classes)
        strategy.mbatch = [torch.cat([x, transformed_negatives(x, model.negatives)]), torch.cat([y, reject]),
                           *(torch.cat([b, b]) for b in batch[2:])]
        self._real_batch = batch

    def _check_minibatch_task(self, strategy) -> None:
        labels = getattr(strategy, "mb_task_id", None)
        if not isinstance(labels, torch.Tensor) or not bool((labels != self.task_id).any()):
            return
        others = sorted(set(int(t) for t in torch.unique(labels).tolist()) - {self.task_id})
        raise ValueError(
            f"a training minibatch of task {self.task_id} carries samples of tasks {others}: HAT needs no "
            "replay. Its masks keep every task it has learned exactly (bit-identical outputs), so "
            "replaying earlier tasks buys nothing, and training on their samples would train their heads "
            "and normalisation statistics. Remove the replay plugin or the data loader that mixes tasks; "
            "HAT learns one task per experience."
        )

    def before_update(self, strategy, **kwargs) -> None:
        for p in self._frozen_parameters:  # plain_parameters="freeze": no step for the plain parts
            p.grad = None

    def close_forward_blocks(self) -> None:
        """Close the blocks ``before_forward`` opened (mask recording and output watching), which
        ``after_forward`` closes after every forward; the HAT strategy also closes them when ``train``
        ends, however it ends. (``allow_task_revisit``'s ``retraining(task)`` is not one of them: it
        wraps the strategy's forward call itself, so that a forward that raises leaves it too.)"""
        if self._recording is not None:
            self._recording.__exit__(None, None, None)
            self._recording = None
        if self._watching is not None:
            self._watching.__exit__(None, None, None)
            self._watching = None

    def after_forward(self, strategy, **kwargs) -> None:
        """Split the negatives' logits off: the criterion and the metrics see the real minibatch.
        Refuse a network whose output layer is a HAT layer (it cannot learn)."""
        self.close_forward_blocks()
        watched, self._watched = self._watched, None
        check_network_output(strategy.mb_output, watched)
        if self._real_batch is None:
            return
        n = len(self._real_batch[0])
        self._negative_logits = strategy.mb_output[n:]
        strategy.mb_output = strategy.mb_output[:n]
        strategy.mbatch, self._real_batch = self._real_batch, None

    def before_backward(self, strategy, **kwargs) -> None:
        model = unwrap_model(strategy.model)
        if self._negative_logits is not None:
            negatives, self._negative_logits = self._negative_logits, None
            target = torch.full((len(negatives),), model.num_classes, dtype=torch.long, device=negatives.device)
            strategy.loss += model.reject_coef * F.cross_entropy(negatives, target)
        scale = model.mask_scale
        if self.reg_coef:
            penalty = hat_regularization(model, self.task_id, scale, kind=self.regularization, quota=self.quota,
                                         recorded=self._masks)
            strategy.loss += self.reg_coef * penalty
        self._masks = None
        if self.weight_decay:
            strategy.loss += 0.5 * self.weight_decay * ownership_respecting_l2(model, self.task_id)
        if self.check_finite:
            self._check_finite_loss(strategy, model)

    def _check_finite_loss(self, strategy, model: nn.Module) -> None:
        loss = strategy.loss
        if not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss.detach()).all()):
            return
        clock = strategy.clock
        trained = trained_tasks(model)
        non_finite = non_finite_state(model)  # only now, when the loss is not finite: no cost otherwise
        if non_finite:
            state = (
                f"The model already holds nan or inf (in {', '.join(non_finite[:5])}"
                + (" and more" if len(non_finite) > 5 else "") + "): an earlier step, whose loss was "
                f"finite, overflowed, and the tasks already learned ({trained}) may be damaged (their "
                "inputs from free units are exactly 0, and 0 * inf is nan). Check their outputs, or go "
                "back to a checkpoint saved before this experience. "
            )
        else:
            state = (
                "Checked now: every parameter and buffer of the model is finite, so no earlier step left "
                f"nan or inf in what the tasks already learned ({trained}) read. "
            )
        raise FloatingPointError(
            f"the training loss of task {self.task_id} is {loss.detach().flatten()[0].item()} at epoch "
            f"{clock.train_exp_epochs}, iteration {clock.train_epoch_iterations} (both counted from 0): "
            "training diverged. This step was stopped before its backward pass and optimizer step (a "
            "non-finite step would reach earlier tasks too: their inputs from free units are exactly 0, "
            "and 0 * nan is nan). " + state
            + "Lower the learning rate, look for nan or inf (or huge values) in the data, or clip the "
            "gradients; HATPlugin(check_finite=False) / HAT(..., check_finite=False) turns this check off."
        )

    # ------------------------------------------------------------------------------- eval
    def before_eval(self, strategy, **kwargs) -> None:
        unwrap_model(strategy.model).mask_scale = None

    def after_eval(self, strategy, **kwargs) -> None:
        # Periodic evaluation inside training: the next iteration sets the scale again.
        unwrap_model(strategy.model).mask_scale = None

    # ------------------------------------------------------------------------ checkpoints
    def __getstate__(self):
        make_optimizers_picklable()
        return self.__dict__.copy()


def _online_with_boundaries(experience) -> bool:
    return isinstance(experience, OnlineCLExperience) and bool(experience.access_task_boundaries)


def _starts_task(experience) -> bool:
    """Whether ``experience`` starts a task: always, except inside an online stream that knows its
    task boundaries, where only the first sub-experience of each experience does."""
    return bool(experience.is_first_subexp) if _online_with_boundaries(experience) else True


def _single_task_label_stream(experience, max_experiences: int = 10_000) -> bool:
    """True if ``experience`` comes from a stream of several experiences that all carry the same
    single task label (class- or domain-incremental). Unknown (lazy, unsized) streams give False;
    the check "task already trained" then fires at the second experience instead."""
    if isinstance(experience, OnlineCLExperience):
        return False
    try:
        stream = experience.origin_stream
        if not 2 <= len(stream) <= max_experiences:
            return False
        return len({tuple(sorted(e.task_labels)) for e in stream}) == 1
    except Exception:  # streams that cannot be listed: rely on the later check
        return False


def non_finite_state(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` that hold nan or inf."""
    return [name for name, t in (*model.named_parameters(), *model.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def ownership_respecting_l2(model: nn.Module, task_id: int) -> torch.Tensor:
    """``sum w^2`` over the weights of HAT layers' output units that no other trained task owns, plus
    the weight of task ``task_id``'s heads. Owned units are left out, so this decay never moves them."""
    total = None
    for module in model.modules():
        if isinstance(module, HATModule):
            free = 1.0 - module.ownership(task_id)
            squares = module.weight.pow(2).flatten(1).sum(1)
            term = (free.to(squares.dtype) * squares).sum()
        elif isinstance(module, TaskIndexedLinear):
            term = module.copy_for(task_id).weight.pow(2).sum()
        else:
            continue
        total = term if total is None else total + term
    return total


def _wrap_forward(strategy, task: int) -> None:
    """Run ``strategy.forward()`` inside ``retraining(task)`` for this experience (the block ends
    with each forward call, however the call ends)."""
    original = strategy.forward

    def forward(*args, **kwargs):
        with retraining(task):
            return original(*args, **kwargs)

    forward._hat_revisit_replaces = strategy.__dict__.get("forward")  # an instance attribute it shadows, if any
    strategy.forward = forward


def _unwrap_forward(strategy) -> None:
    drop_revisit_wrapper(strategy.__dict__)


def drop_revisit_wrapper(attributes: dict) -> None:
    """Take the per-experience revisit wrapper out of a strategy's attribute dict (its ``__dict__``,
    or the copy a pickle takes), putting back any ``forward`` attribute it shadowed."""
    wrapper = attributes.get("forward")
    if wrapper is None or not hasattr(wrapper, "_hat_revisit_replaces"):
        return
    previous = wrapper._hat_revisit_replaces
    if previous is None:
        del attributes["forward"]
    else:
        attributes["forward"] = previous
