"""Class-incremental HAT: task-id prediction at test time (no task labels at inference).

HAT picks its masks by task id. On a class-incremental stream (every experience labelled task 0) the
:class:`HATPlugin` trains experience ``i`` as HAT task ``i``; at evaluation
:class:`HATClassIncrementalModel` runs the input through every trained task's binary-masked network
in one batched pass (:mod:`.task_inference`), scores how well each task explains it, and returns
log-probabilities over all classes: ``log q(t | x) + log p(c | x, t)`` for class ``c`` of task
``t``, where ``p(c | x, t)`` is task ``t``'s head and ``q(t | x)`` the task posterior below
(Kim et al., 2022: class-incremental probability = task-id probability x within-task probability).

Task scores (higher: the input looks more like task ``t``'s data):

- ``msp``: maximum softmax probability of the head, ``max_c log p(c | x, t)`` (Hendrycks & Gimpel).
- ``energy``: ``logsumexp_c l_c`` of the head's logits, the negative free energy (Liu et al., 2020).
- ``entropy``: ``sum_c p log p``, the negative entropy of the head's softmax.
- ``reject``: heads with one extra "reject" logit, trained with transformed samples of their own
  task (rotations by 90/180/270 degrees by default) as negatives; the score is the largest in-task
  probability of that ``K + 1``-way softmax (the "max in-task softmax" of OOD-trained heads).
- ``mahalanobis``: minus the smallest Mahalanobis distance of task ``t``'s features to its class
  means, with one shared covariance per task (Lee et al., 2018), estimated from the task's
  training data when the task ends, shrunk towards a multiple of the identity.

Calibration across tasks. Heads learned at different times are not equally confident, so raw
scores are not comparable. When task ``t`` ends, its score is measured on held-out samples of its
own training data (``calibration_fraction`` of the experience, never trained on) and the mean and
standard deviation are stored; at inference each task's score is z-normalised with its own
statistics, ``z_t = (s_t - mean_t) / std_t``, i.e. measured in units of how the task scores its own
data. ``q(t | x) = softmax_t(z_t / task_temperature)``; ``task_temperature=0`` picks the task with
the highest ``z_t`` outright. HAT never changes a trained task's network, so these statistics stay
exact for ever; they live in module buffers, so ``state_dict`` and checkpoints carry them.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Sequence

import torch
from avalanche.models import MultiTaskModule
from torch import nn

from ..config import HATConfig
from ..modules import TaskIndexedLinear
from ..network import trained_tasks
from ..payload import HATPayload
from .model import backbone_hat_config, backbone_num_features, check_task_in_range
from .task_inference import batched_matches_loop, for_each_task

SCORES = ("msp", "energy", "entropy", "reject", "mahalanobis")

#: Output for classes no trained task has: far below any log-probability, finite (so that a loss
#: on a class not learned yet stays finite, also in half precision).
UNSEEN_LOGIT = -1.0e4


def _rotate(quarter_turns: int):
    def rotate(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != x.shape[-2] and quarter_turns % 2:
            raise ValueError(
                f"rotating by {90 * quarter_turns} degrees needs square images, got {tuple(x.shape[-2:])}: "
                "use negatives=('rot180', 'vflip')"
            )
        return torch.rot90(x, quarter_turns, dims=(-2, -1))

    return rotate


#: Transforms that turn a task's images into negatives for its reject logit.
NEGATIVE_TRANSFORMS = {
    "rot90": _rotate(1),
    "rot180": _rotate(2),
    "rot270": _rotate(3),
    "vflip": lambda x: x.flip(-2),
}


def transformed_negatives(x: torch.Tensor, transforms: Sequence[str]) -> torch.Tensor:
    """One negative per sample: each sample transformed by one of ``transforms``, drawn at random
    (from torch's global generator, so seeded runs repeat)."""
    if x.ndim < 3:
        raise ValueError(f"negatives by rotation or flip need image batches (N, C, H, W), got shape {tuple(x.shape)}")
    choice = torch.randint(len(transforms), (len(x),), device=x.device)
    out = torch.empty_like(x)
    for i, name in enumerate(transforms):
        picked = choice == i
        if bool(picked.any()):
            out[picked] = NEGATIVE_TRANSFORMS[name](x[picked])
    return out


def task_posterior(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log q(t | x) = log_softmax_t(z_t / temperature)`` over the first dimension; temperature 0:
    0 for the task with the highest ``z`` and :data:`UNSEEN_LOGIT` for the others."""
    if temperature == 0:
        return torch.full_like(z, UNSEEN_LOGIT).scatter(0, z.argmax(0, keepdim=True), 0.0)
    return (z / temperature).log_softmax(0)


class HATClassIncrementalModel(MultiTaskModule):
    """A HAT network for class-incremental streams: per-task heads, task-id prediction at test time.

    Usage (the HAT strategy and the HATPlugin switch to class-incremental training for this model)::

        benchmark = SplitFMNIST(5, return_task_id=False, seed=0)  # every experience: task label 0
        net = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=5), num_classes=0, in_chans=1)
        model = HATClassIncrementalModel(net, num_classes=10, classes_per_task=2)
        strategy = HAT(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=64)
        for experience in benchmark.train_stream:
            strategy.train(experience)
            strategy.eval(benchmark.test_stream)  # accuracy over all classes, no task labels used

    Training (driven by the :class:`HATPlugin`, which sets ``train_task``): experience ``i`` is HAT
    task ``i``; the output is ``num_classes`` logits (plus one reject logit last, with
    ``reject_head``), the current task's head at its classes and :data:`UNSEEN_LOGIT` elsewhere, so
    the usual cross entropy on the stream's global class ids trains that head only.

    Evaluation (``model.eval()``): log-probabilities over all ``num_classes`` classes from every
    trained task at once (see the module docstring); classes not learned yet get
    :data:`UNSEEN_LOGIT`. Avalanche's accuracy, loss and forgetting metrics work unchanged.
    ``forward_task(x, t)`` gives task ``t``'s output when the task is known (task-incremental
    evaluation of the same model), ``predict_task(x)`` the predicted task ids.

    Args:
        backbone: a HAT network returning features (e.g. ``timm.create_model('hat_resnet18s',
            hat_config=cfg, num_classes=0)``).
        num_classes: classes in the whole stream (width of the output; global class ids).
        classes_per_task: the most classes one experience holds (width of each head).
        hat_config: the backbone's HATConfig (found in its layers when omitted); ``num_tasks`` must
            cover the number of experiences.
        num_features: width of the backbone's output; defaults to ``backbone.num_features``.
        task_score: the score that picks the task, one of :data:`SCORES`.
        reject_head: give each head a reject logit trained with transformed negatives.
        negatives: names in :data:`NEGATIVE_TRANSFORMS`; each training sample gets one, drawn at random.
        reject_coef: weight of the reject loss on the negatives.
        calibration_fraction: share of each experience's training data held out (not trained on)
            to calibrate the task's scores; 0 calibrates on the training data.
        covariance_shrinkage: ``a`` in the Mahalanobis covariance ``S + a * mean(diag S) * I``.
        task_temperature: ``q(t | x) = softmax(z / task_temperature)``; 0 takes the best task outright.
        feature_statistics: keep class means and a precision matrix per task (needed by
            ``mahalanobis``; ``num_tasks * num_features**2`` floats). Default: when ``task_score`` is
            ``mahalanobis``.
        batched: evaluate all tasks in one batched pass (checked once against separate forwards,
            which are used instead, with a warning, if the network keeps per-task state elsewhere).

    The defaults were chosen on a 10% holdout of Split Fashion-MNIST's training data (5 tasks, the
    leaderboard's MLP, 3 epochs, seeds 0-2; ``benchmarks/class_incremental_holdout.py``, results in
    ``benchmarks/results/fmnist_class_hat_design.jsonl``), never on the test set. Class-incremental
    accuracy: ``mahalanobis`` 79.3% (raw, uncalibrated: 77.2%) against ``reject`` 58.4%, ``energy``
    55.7%, ``msp`` 53.8%, ``entropy`` 53.4%; without the reject head 76.7%; shrinkage 0.001 / 0.01
    / 0.1 / 1: 79.3 / 79.3 / 78.8 / 77.0%; temperature 0 / 0.5 / 1 / 2: 79.20 / 79.26 / 79.30 /
    79.29%.
    """

    class_incremental = True

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        classes_per_task: int,
        hat_config: HATConfig | None = None,
        *,
        num_features: int | None = None,
        task_score: str = "mahalanobis",
        reject_head: bool = True,
        negatives: Sequence[str] = ("rot90", "rot180", "rot270"),
        reject_coef: float = 1.0,
        calibration_fraction: float = 0.1,
        covariance_shrinkage: float = 0.01,
        task_temperature: float = 1.0,
        feature_statistics: bool | None = None,
        batched: bool = True,
    ) -> None:
        super().__init__()
        hat_config = backbone_hat_config(backbone, hat_config)
        if (getattr(backbone, "num_classes", None) or 0) > 0:
            raise ValueError(
                f"{type(backbone).__name__} already ends in a classifier: create it with num_classes=0 so "
                "that it returns features; the class-incremental heads are added here"
            )
        for name, value in (("num_classes", num_classes), ("classes_per_task", classes_per_task)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if classes_per_task > num_classes:
            raise ValueError(f"classes_per_task={classes_per_task} exceeds num_classes={num_classes}")
        num_features = backbone_num_features(backbone, num_features)
        unknown = [n for n in negatives if n not in NEGATIVE_TRANSFORMS]
        if reject_head and (not negatives or unknown):
            raise ValueError(f"negatives must be names from {sorted(NEGATIVE_TRANSFORMS)}, got {list(negatives)!r}")
        if not 0 <= calibration_fraction < 1:
            raise ValueError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
        if not (reject_coef >= 0 and covariance_shrinkage > 0 and task_temperature >= 0):
            raise ValueError("reject_coef and task_temperature must be >= 0, covariance_shrinkage > 0")
        if feature_statistics is None:
            feature_statistics = task_score == "mahalanobis"
        self.backbone = backbone
        self.hat_config = hat_config
        self.mask_scale: float | None = None
        self.num_classes = num_classes
        self.classes_per_task = classes_per_task
        self.num_features = num_features
        self.reject_head = bool(reject_head)
        self.negatives = tuple(negatives)
        self.reject_coef = float(reject_coef)
        self.calibration_fraction = float(calibration_fraction)
        self.covariance_shrinkage = float(covariance_shrinkage)
        self.task_temperature = float(task_temperature)
        self.feature_statistics = bool(feature_statistics)
        self.batched = bool(batched)
        self.train_task: int | None = None  # set by the HATPlugin while it trains a task
        self._batched_checked = False
        if task_score not in self.available_scores:
            raise ValueError(
                f"task_score {task_score!r} is not available: choose from {self.available_scores} "
                "('reject' needs reject_head=True, 'mahalanobis' feature_statistics=True)"
            )
        self.task_score = task_score

        like = next(backbone.parameters())
        factory = dict(device=like.device)
        num_tasks = hat_config.num_tasks
        self.head = TaskIndexedLinear(num_features, classes_per_task + self.reject_head, hat_config,
                                      dtype=like.dtype, **factory)
        # Global class id of each (task, local class); -1 where a task has fewer classes.
        self.register_buffer("task_classes", torch.full((num_tasks, classes_per_task), -1, dtype=torch.long, **factory))
        self.register_buffer("score_mean", torch.zeros(num_tasks, len(SCORES), **factory))
        self.register_buffer("score_std", torch.ones(num_tasks, len(SCORES), **factory))
        self.register_buffer("task_calibrated", torch.zeros(num_tasks, dtype=torch.bool, **factory))
        if self.feature_statistics:
            self.register_buffer("feature_mean", torch.zeros(num_tasks, classes_per_task, num_features, **factory))
            self.register_buffer("feature_precision", torch.zeros(num_tasks, num_features, num_features, **factory))
            # Features a task ever sets (the others are 0 on all of its data: masked or dead units)
            # and the ridge added to its covariance; see _mahalanobis.
            self.register_buffer("feature_active", torch.zeros(num_tasks, num_features, dtype=torch.bool, **factory))
            self.register_buffer("feature_ridge", torch.ones(num_tasks, **factory))

    # --------------------------------------------------------------------------- tasks
    @property
    def available_scores(self) -> tuple[str, ...]:
        return tuple(s for s in SCORES if (s != "reject" or self.reject_head)
                     and (s != "mahalanobis" or self.feature_statistics))

    def check_task_label(self, task_label: int) -> int:
        return check_task_in_range(self.hat_config, task_label, "experience")

    def classes_of(self, task: int) -> list[int]:
        """The global class ids of ``task`` (its head's outputs in this order)."""
        row = self.task_classes[self.check_task_label(task)]
        return row[row >= 0].tolist()

    @torch.no_grad()
    def register_task(self, task: int, classes: Iterable[int]) -> None:
        """Record that HAT task ``task`` learns ``classes`` (global ids; head output ``i`` is the
        ``i``-th smallest). Called by the HATPlugin at the start of each experience."""
        task = self.check_task_label(task)
        classes = sorted({int(c) for c in classes})
        if not classes:
            raise ValueError(f"task {task} has no classes")
        if len(classes) > self.classes_per_task:
            raise ValueError(
                f"experience {task} has {len(classes)} classes but the heads have classes_per_task="
                f"{self.classes_per_task}: build HATClassIncrementalModel with classes_per_task >= {len(classes)}"
            )
        if classes[0] < 0 or classes[-1] >= self.num_classes:
            raise ValueError(f"class ids {classes} are outside 0..{self.num_classes - 1} (num_classes={self.num_classes})")
        known = self.classes_of(task)
        if known and known != classes:
            raise ValueError(f"task {task} already learned classes {known}, now given {classes}")
        taken = {c: t for t in range(self.hat_config.num_tasks) if t != task for c in self.classes_of(t)}
        clash = sorted(c for c in classes if c in taken)
        if clash:
            raise ValueError(
                f"classes {clash} of experience {task} were already learned by task(s) "
                f"{sorted({taken[c] for c in clash})}: in a class-incremental stream each class belongs to "
                "one experience"
            )
        row = torch.full((self.classes_per_task,), -1, dtype=torch.long)
        row[: len(classes)] = torch.tensor(classes)
        self.task_classes[task] = row.to(self.task_classes.device)

    @torch.no_grad()
    def forget_task_state(self, task: int) -> None:
        """Drop what the model records about ``task`` (its classes, score calibration and feature
        statistics), as :func:`avalanche_hat.forget_task` does for its layers: the task id can then
        be learned again, with other classes if need be."""
        task = self.check_task_label(task)
        self.task_classes[task] = -1
        self.score_mean[task] = 0.0
        self.score_std[task] = 1.0
        self.task_calibrated[task] = False
        if self.feature_statistics:
            self.feature_mean[task] = 0.0
            self.feature_precision[task] = 0.0
            self.feature_active[task] = False
            self.feature_ridge[task] = 1.0

    def inference_tasks(self) -> list[int]:
        """The tasks evaluation chooses from: trained tasks with classes, and the task in training."""
        trained = set(trained_tasks(self))
        if self.train_task is not None:
            trained.add(self.train_task)
        return [t for t in sorted(trained) if bool((self.task_classes[t] >= 0).any())]

    # ----------------------------------------------------------------------------- forward
    def task_outputs(self, x: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, head logits)`` of task ``task``'s network; the logits are the task's classes
        in :meth:`classes_of` order, then the reject logit."""
        scale = self.mask_scale if self.training else None
        out = self.backbone(HATPayload(x, task_id=task, mask_scale=scale))
        features = out.data if isinstance(out, HATPayload) else out
        return features, self.head(features, task)

    def forward_task(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Task ``task``'s head over all ``num_classes`` classes (task-incremental evaluation):
        its logits at its classes, :data:`UNSEEN_LOGIT` elsewhere."""
        task = self.check_task_label(task)
        _, logits = self.task_outputs(x, task)
        return self._scatter_task(logits, task, reject=False)

    forward_single_task = forward_task

    def _scatter_task(self, logits: torch.Tensor, task: int, reject: bool) -> torch.Tensor:
        classes = self.task_classes[task]
        valid = classes >= 0
        if not bool(valid.any()):
            raise RuntimeError(f"task {task} has no classes registered: train it with the HATPlugin first")
        out = logits.new_full((len(logits), self.num_classes + int(reject)), UNSEEN_LOGIT)
        out[:, classes[valid]] = logits[:, : self.classes_per_task][:, valid]
        if reject:
            out[:, self.num_classes] = logits[:, self.classes_per_task]
        return out

    def forward(self, x: torch.Tensor, task_labels=None) -> torch.Tensor:
        """Training: the current task's logits (plus the reject logit). Evaluation: log-probabilities
        over all classes, the task predicted. ``task_labels`` (all 0 in a class-incremental stream)
        are not used."""
        if self.training:
            if self.train_task is None:
                raise RuntimeError(
                    "HATClassIncrementalModel is in training mode but no task is being trained: train it "
                    "with the HAT strategy or the HATPlugin, which set model.train_task per experience"
                )
            _, logits = self.task_outputs(x, self.train_task)
            return self._scatter_task(logits, self.train_task, reject=self.reject_head)
        return self.log_proba(x)

    # ------------------------------------------------------------------------- inference
    def all_task_outputs(self, x: torch.Tensor, tasks: Sequence[int] | None = None):
        """``(features, logits)`` of every task in ``tasks`` (default: :meth:`inference_tasks`), stacked
        on a first dimension of size ``T``; one batched pass in eval mode."""
        tasks = self.inference_tasks() if tasks is None else [int(t) for t in tasks]
        was_training = self.training
        self.eval()
        try:
            fn = lambda task: self.task_outputs(x, task)  # noqa: E731
            batched = self.batched
            if batched and not self._batched_checked and len(tasks) > 1:
                self._batched_checked = True
                sample = x[:4]
                if not batched_matches_loop(self, lambda task: self.task_outputs(sample, task), tasks):
                    warnings.warn(
                        f"{type(self.backbone).__name__} keeps per-task state outside HAT layers and "
                        "task-indexed modules: the batched pass differs from separate forwards, so tasks "
                        "are evaluated one by one (model.batched = False)", stacklevel=2)
                    self.batched = batched = False
            return for_each_task(self, fn, tasks, batched=batched)
        finally:
            self.train(was_training)

    def _valid(self, tasks: Sequence[int]) -> torch.Tensor:
        return self.task_classes[list(tasks)] >= 0  # (T, K)

    def task_scores(self, features: torch.Tensor, logits: torch.Tensor, tasks: Sequence[int],
                    methods: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Raw scores ``(T, B)`` of each method from the stacked outputs of :meth:`all_task_outputs`."""
        methods = self.available_scores if methods is None else tuple(methods)
        for m in methods:
            if m not in self.available_scores:
                raise ValueError(f"score {m!r} is not available on this model: {self.available_scores}")
        k = self.classes_per_task
        valid = self._valid(tasks).unsqueeze(1)  # T, 1, K
        class_logits = logits[..., :k].float().masked_fill(~valid, -math.inf)
        log_p = class_logits.log_softmax(-1)
        out = {}
        if "msp" in methods:
            out["msp"] = log_p.max(-1).values
        if "energy" in methods:
            out["energy"] = class_logits.logsumexp(-1)
        if "entropy" in methods:
            out["entropy"] = torch.where(valid, log_p.exp() * log_p, torch.zeros_like(log_p)).sum(-1)
        if "reject" in methods:
            with_reject = torch.cat([class_logits, logits[..., k:].float()], dim=-1).log_softmax(-1)
            out["reject"] = with_reject[..., :k].max(-1).values
        if "mahalanobis" in methods:
            out["mahalanobis"] = -self._mahalanobis(features.float(), tasks, valid)
        return out

    def _mahalanobis(self, features: torch.Tensor, tasks: Sequence[int], valid: torch.Tensor) -> torch.Tensor:
        """Smallest squared Mahalanobis distance ``(f - mu_c)^T P (f - mu_c)`` over the task's classes.

        A feature that is 0 on all of a task's training data (a unit its masks switch off, or a
        dead one) has mean 0 and no covariance with the others, so ``P`` is block diagonal: the
        active block ``P_A`` and ``1 / ridge`` on the rest. The distance is computed that way,
        exactly: ``(f_A - mu_A)^T P_A (f_A - mu_A)`` over the active features (HAT's tasks use a
        fraction of the units, so this is a fraction of an ``F x F`` product), expanded as
        ``f^T P f - 2 f^T P mu_c + mu_c^T P mu_c``, plus ``|f_rest|^2 / ridge``."""
        index = list(tasks)
        active = self.feature_active[index]  # (T, F)
        width = max(int(active.sum(1).max()), 1)
        order = torch.argsort((~active).to(torch.uint8), dim=1, stable=True)[:, :width]  # active units first
        t, b, f = features.shape
        k = self.classes_per_task
        x = features.gather(2, order.unsqueeze(1).expand(t, b, width))
        mean = self.feature_mean[index].float().gather(2, order.unsqueeze(1).expand(t, k, width))
        precision = self.feature_precision[index].float()
        precision = precision.gather(1, order.unsqueeze(2).expand(t, width, f)).gather(
            2, order.unsqueeze(1).expand(t, width, width))  # (T, A, A); 0 where a padded unit is inactive
        px = x @ precision  # (T, B, A); P is symmetric
        distance = ((px * x).sum(-1, keepdim=True) - 2 * px @ mean.transpose(1, 2)
                    + ((mean @ precision) * mean).sum(-1).unsqueeze(1))  # (T, B, K)
        rest = (features.square() * (~active).unsqueeze(1)).sum(-1) / self.feature_ridge[index].float().unsqueeze(1)
        return (distance.clamp_min(0) + rest.unsqueeze(-1)).masked_fill(~valid, math.inf).min(-1).values

    def calibrate(self, scores: torch.Tensor, tasks: Sequence[int], method: str) -> torch.Tensor:
        """``(s_t - mean_t) / std_t`` with each task's statistics from its held-out data (tasks not
        calibrated yet keep their raw score)."""
        column = SCORES.index(method)
        index = list(tasks)
        return (scores - self.score_mean[index, column].unsqueeze(1)) / self.score_std[index, column].unsqueeze(1)

    def task_log_posterior(self, features, logits, tasks, method: str | None = None,
                           calibrated: bool = True) -> torch.Tensor:
        """``log q(t | x)`` of shape ``(T, B)`` (see the module docstring)."""
        method = method or self.task_score
        z = self.task_scores(features, logits, tasks, (method,))[method]
        if calibrated:
            z = self.calibrate(z, tasks, method)
        return task_posterior(z, self.task_temperature)

    def joint_log_proba(self, features, logits, tasks, log_q: torch.Tensor) -> torch.Tensor:
        """``log q(t | x) + log p(c | x, t)`` placed at the global class ids: ``(B, num_classes)``."""
        k = self.classes_per_task
        valid = self._valid(tasks)
        within = logits[..., :k].float().masked_fill(~valid.unsqueeze(1), -math.inf).log_softmax(-1)
        joint = (within + log_q.unsqueeze(-1)).permute(1, 0, 2)  # B, T, K
        out = joint.new_full((joint.shape[0], self.num_classes), UNSEEN_LOGIT)
        out[:, self.task_classes[list(tasks)][valid]] = joint[:, valid]
        return out

    def log_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over all ``num_classes`` classes (evaluation output)."""
        tasks = self.inference_tasks()
        if not tasks:
            return x.new_full((len(x), self.num_classes), UNSEEN_LOGIT, dtype=torch.float32)
        features, logits = self.all_task_outputs(x, tasks)
        log_q = self.task_log_posterior(features, logits, tasks)
        return self.joint_log_proba(features, logits, tasks, log_q)

    @torch.no_grad()
    def predict_task(self, x: torch.Tensor, method: str | None = None, calibrated: bool = True) -> torch.Tensor:
        """The predicted HAT task id of each sample (the highest calibrated score)."""
        tasks = self.inference_tasks()
        if not tasks:
            raise RuntimeError("no task has been trained yet")
        features, logits = self.all_task_outputs(x, tasks)
        method = method or self.task_score
        z = self.task_scores(features, logits, tasks, (method,))[method]
        if calibrated:
            z = self.calibrate(z, tasks, method)
        return torch.tensor(tasks, device=z.device)[z.argmax(0)]

    # ------------------------------------------------------------------------ statistics
    @torch.no_grad()
    def record_task_statistics(self, task: int, fit_batches: Iterable, calibration_batches: Iterable | None = None) -> None:
        """Store what task ``task``'s scores need, from its own data, with its binary masks.

        ``fit_batches`` (the task's training data: ``(x, y, ...)`` batches, global labels) give the
        class means and the shared covariance of the features (``mahalanobis``);
        ``calibration_batches`` (held-out samples of the task; the fit batches when None) give the
        mean and standard deviation of every score (the z-normalisation)."""
        task = self.check_task_label(task)
        classes = self.classes_of(task)
        if not classes:
            raise RuntimeError(f"task {task} has no classes registered")
        was_training = self.training
        self.eval()
        try:
            if self.feature_statistics:
                self._fit_features(task, classes, fit_batches)
            scores = {m: [] for m in self.available_scores}
            for batch in (fit_batches if calibration_batches is None else calibration_batches):
                x = batch[0].to(self.task_classes.device)
                features, logits = self.task_outputs(x, task)
                for m, s in self.task_scores(features[None], logits[None], [task]).items():
                    scores[m].append(s[0])
            for m, values in scores.items():
                values = torch.cat(values)
                column = SCORES.index(m)
                self.score_mean[task, column] = values.mean()
                self.score_std[task, column] = values.std().clamp_min(1e-6) if len(values) > 1 else 1.0
            self.task_calibrated[task] = True
        finally:
            self.train(was_training)

    def _fit_features(self, task: int, classes: list[int], batches: Iterable) -> None:
        device = self.task_classes.device
        local = torch.full((self.num_classes,), -1, dtype=torch.long, device=device)
        local[torch.tensor(classes, device=device)] = torch.arange(len(classes), device=device)
        f = self.num_features
        sums = torch.zeros(self.classes_per_task, f, dtype=torch.float64, device=device)
        counts = torch.zeros(self.classes_per_task, dtype=torch.float64, device=device)
        scatter = torch.zeros(f, f, dtype=torch.float64, device=device)
        active = torch.zeros(f, dtype=torch.bool, device=device)
        for batch in batches:
            x, y = batch[0].to(device), torch.as_tensor(batch[1], device=device)
            ids = local[y]
            if bool((ids < 0).any()):
                raise ValueError(f"task {task} learns classes {classes}, but its data holds {sorted(set(y[ids < 0].tolist()))}")
            features, _ = self.task_outputs(x, task)
            features = features.double()
            sums.index_add_(0, ids, features)
            counts += torch.bincount(ids, minlength=self.classes_per_task).double()
            scatter += features.T @ features
            active |= (features != 0).any(0)
        n = counts.sum()
        if n < 2:
            raise ValueError(f"task {task} needs at least 2 samples to estimate its feature covariance")
        means = sums / counts.clamp_min(1).unsqueeze(1)
        covariance = (scatter - (means.T * counts) @ means) / n  # within-class scatter / n
        ridge = self.covariance_shrinkage * covariance.diagonal().mean().clamp_min(1e-12)
        on = active.nonzero().flatten()
        block = covariance[on][:, on] + ridge * torch.eye(len(on), dtype=torch.float64, device=device)
        precision = torch.zeros(f, f, dtype=torch.float64, device=device)
        precision[on.unsqueeze(1), on] = torch.linalg.inv(block)
        self.feature_mean[task] = means.to(self.feature_mean.dtype)
        self.feature_precision[task] = (0.5 * (precision + precision.T)).to(self.feature_precision.dtype)
        self.feature_active[task] = active
        self.feature_ridge[task] = ridge.to(self.feature_ridge.dtype)

    def extra_repr(self) -> str:
        return (f"num_tasks={self.hat_config.num_tasks}, num_classes={self.num_classes}, "
                f"classes_per_task={self.classes_per_task}, task_score={self.task_score!r}, "
                f"reject_head={self.reject_head}, mask_scale={self.mask_scale}")


@torch.no_grad()
def evaluate_task_inference(model: HATClassIncrementalModel, batches: Iterable,
                            methods: Sequence[str] | None = None) -> dict:
    """Task-id prediction and class-incremental accuracy of every score, raw and calibrated, from
    one batched pass per batch. The true task of a sample is the task that learned its class;
    samples of classes no trained task has are left out (counted in ``"unknown"``).

    Returns ``{"samples": n, "unknown": m, "task_accuracy": {method: {"calibrated": a, "raw": a}},
    "accuracy": {method: {"calibrated": a, "raw": a}}}`` (fractions)."""
    tasks = model.inference_tasks()
    if not tasks:
        raise RuntimeError("no task has been trained yet")
    methods = model.available_scores if methods is None else tuple(methods)
    device = model.task_classes.device
    owner = torch.full((model.num_classes,), -1, dtype=torch.long, device=device)
    for t in tasks:
        owner[torch.tensor(model.classes_of(t), device=device)] = t
    task_ids = torch.tensor(tasks, device=device)
    hits = {kind: {m: {"calibrated": 0, "raw": 0} for m in methods} for kind in ("task_accuracy", "accuracy")}
    n = unknown = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x, y = batch[0].to(device), torch.as_tensor(batch[1], device=device)
            true_task = owner[y]
            known = true_task >= 0
            unknown += int((~known).sum())
            if not bool(known.any()):
                continue
            x, y, true_task = x[known], y[known], true_task[known]
            n += len(y)
            features, logits = model.all_task_outputs(x, tasks)
            raw = model.task_scores(features, logits, tasks, methods)
            for m in methods:
                for kind, calibrated in (("calibrated", True), ("raw", False)):
                    s = model.calibrate(raw[m], tasks, m) if calibrated else raw[m]
                    hits["task_accuracy"][m][kind] += int((task_ids[s.argmax(0)] == true_task).sum())
                    log_q = task_posterior(s, model.task_temperature)
                    predicted = model.joint_log_proba(features, logits, tasks, log_q).argmax(1)
                    hits["accuracy"][m][kind] += int((predicted == y).sum())
    finally:
        model.train(was_training)
    result = {"samples": n, "unknown": unknown}
    for kind, per_method in hits.items():
        result[kind] = {m: {k: (v / n if n else math.nan) for k, v in d.items()} for m, d in per_method.items()}
    return result
