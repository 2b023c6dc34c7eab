"""What every HAT layer and every task-indexed layer shares."""
from __future__ import annotations

from contextvars import ContextVar

import torch
from torch import nn

from .. import guard, opt_ins
from ..config import HATConfig
from ..mechanism import fused
from ..mechanism.masks import (binary_mask, nullification_factor, owned_by, ownership, protecting_tasks, scale_grad,
                               soft_mask)
from ..payload import HATPayload


# The open ``recorded_masks()`` block, if any (see avalanche_hat.network): the training forward of a
# HAT layer leaves its soft mask and ownership there for the regulariser. Scoped to the block.
MASK_RECORD: ContextVar["dict | None"] = ContextVar("avalanche_hat_mask_record", default=None)


def as_payload(module: nn.Module, x) -> HATPayload:
    if isinstance(x, HATPayload):
        return x
    if isinstance(x, torch.Tensor):
        raise TypeError(
            f"{type(module).__name__} takes a HATPayload, not a bare tensor: wrap the input as "
            "HATPayload(x, task_id=t, mask_scale=s) (mask_scale=None for inference, task_id=None "
            "for the plain network)"
        )
    raise TypeError(f"{type(module).__name__} takes a HATPayload, got {type(x).__name__}")


class HATModule(nn.Module):
    """A layer whose output units are gated per task by ``a = sigmoid(s e)`` (Eq. 1).

    State (all in ``state_dict``, so it survives save/load, ``deepcopy``, pickling and ``.to``):
    ``mask_embedding`` (``num_tasks x units``), ``hat_trained``, the tasks whose units are
    protected, and ``hat_stepped``, the tasks that had training forwards here (a training forward
    of a task is refused while another task has steps and is not marked trained). Masks, ownership
    and the gradient factors of Eq. 2 are computed in every forward from that state; after every
    optimizer step what the protected tasks own is restored from a reference derived from the
    parameters (:mod:`avalanche_hat.guard`, never persisted).
    """

    hat_config: HATConfig
    unit_dim: int  # axis of the output along which the mask lies (1 for conv, -1 for linear)

    def _init_hat(self, hat_config: HATConfig, units: int, device=None, dtype=None) -> None:
        if not isinstance(hat_config, HATConfig):
            raise TypeError(
                f"{type(self).__name__} needs a HATConfig, e.g. HATConfig(num_tasks=5); got {type(hat_config).__name__}"
            )
        self.hat_config = hat_config
        emb = torch.empty(hat_config.num_tasks, units, device=device, dtype=dtype or torch.get_default_dtype())
        self.mask_embedding = nn.Parameter(hat_config.init_embedding_(emb))
        self.register_buffer("hat_trained", torch.zeros(hat_config.num_tasks, dtype=torch.bool, device=device))
        self.register_buffer("hat_stepped", torch.zeros(hat_config.num_tasks, dtype=torch.bool, device=device))
        guard.register(self)

    # ------------------------------------------------------------- protection bookkeeping (guard)
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "hat_stepped" not in state_dict and prefix + "hat_trained" in state_dict:
            # A checkpoint written before hat_stepped existed: its trained tasks had training steps.
            state_dict[prefix + "hat_stepped"] = state_dict[prefix + "hat_trained"]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        guard.reset(self)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        guard.moved(self)  # .to(), .double(), ...: the reference is checked against the new tensors
        return out

    def __getstate__(self):
        return guard.without_guard(super().__getstate__())

    def __setstate__(self, d):
        super().__setstate__(d)
        if "hat_stepped" not in self._buffers and "hat_trained" in self._buffers:
            self._buffers["hat_stepped"] = self._buffers["hat_trained"].clone()
        guard.register(self)

    @property
    def num_units(self) -> int:
        return self.mask_embedding.shape[1]

    # ----------------------------------------------------------------------------- masks
    def mask(self, task_id: int | None, mask_scale: float | None) -> torch.Tensor | None:
        """The mask of ``task_id``: soft at ``mask_scale``, binary when it is None; None for the plain network."""
        if task_id is None:
            return None
        self.hat_config.check_task_id(task_id)
        return self._mask(task_id, mask_scale)

    def _mask(self, task_id: int, mask_scale: float | None) -> torch.Tensor:
        embedding = self.mask_embedding
        if mask_scale is None:
            return binary_mask(embedding[task_id])
        cfg = self.hat_config
        if cfg.gradient_compensation:
            kernels = fused.usable(embedding)
            if kernels is not None:  # one loop each way instead of a chain of small operations
                return kernels.soft_mask(embedding, task_id, float(mask_scale), float(cfg.max_mask_scale),
                                         *fused.saturation_args(cfg.compensation_clamp))
        return soft_mask(embedding[task_id], mask_scale, cfg.max_mask_scale, cfg.gradient_compensation,
                         cfg.compensation_clamp)

    def binary_mask(self, task_id: int) -> torch.Tensor:
        self.hat_config.check_task_id(task_id)
        return binary_mask(self.mask_embedding[task_id])

    def ownership(self, task_id: int | None) -> torch.Tensor:
        """0/1 per unit: owned by a trained task other than ``task_id`` (Eq. 2's ``a^{<t}``)."""
        return ownership(self.mask_embedding, self.hat_trained, task_id)

    def _training_ownership(self, task_id: int, locked: frozenset = frozenset()) -> tuple[torch.Tensor, bool]:
        """Eq. 2's ownership for a training step (the trained tasks and the ``locked`` ones protect
        their units), and whether it is known without a device synchronisation that no unit is
        owned (on the CPU, when no other task is trained or locked)."""
        trained = self.hat_trained
        if trained.is_cpu:
            tasks = sorted(set(protecting_tasks(trained, task_id)) | set(locked))
            return owned_by(self.mask_embedding, tasks), not tasks
        if locked:
            trained = trained.clone()
            trained[sorted(locked)] = True
            return ownership(self.mask_embedding, trained, task_id), False
        return self.ownership(task_id), False

    def clamp_embedding_(self) -> None:
        c = self.hat_config.embedding_clamp
        kernels = fused.usable(self.mask_embedding)
        if kernels is not None:
            kernels.clamp_embedding(self.mask_embedding, float(c))
        else:
            self.mask_embedding.data.clamp_(-c, c)  # .data: outside autograd, no no_grad context needed

    # --------------------------------------------------------------------------- forward
    def _hat_forward(self, payload, compute, in_units: int, in_axis: int, groups: int = 1, nullified=None,
                     masked_nullified=None, plain_when_free: bool = True) -> HATPayload:
        """Shared forward: checks, Eq. 2 on weight and bias, the layer itself, the pending mask.

        ``compute(x, weight, bias)`` is the plain layer; ``nullified(x, weight, bias, out_owned,
        in_owned)``, if given, is a fused version applying Eq. 2 in its own backward from the 0/1
        ownership of the output units and of the inputs (``None``: unknown); ``masked_nullified(x,
        weight, bias, out_owned, in_owned, task_id, scale)`` also computes the soft mask (one autograd
        node for the whole training step) and returns ``(output, mask)``. While no other task owns a
        unit of the layer, Eq. 2 is the identity and, with ``plain_when_free``, the layer trains
        through ``compute`` and autograd's own backward (a task's first units on the CPU)."""
        payload = as_payload(self, payload)
        task_id, scale = payload.task_id, payload.mask_scale
        self.hat_config.check_task_id(task_id)
        x = payload.data
        if x.ndim < 2 or x.shape[in_axis] != in_units:
            raise ValueError(
                f"{type(self).__name__} expects {in_units} input units along axis {in_axis}, got an "
                f"input of shape {tuple(x.shape)}"
            )
        guard.forward_start(self)  # an optimizer outside torch.optim wrote here: restore first
        weight, bias = self.weight, self.bias
        training = self.training and torch.is_grad_enabled()
        if task_id is None:
            if training:
                guard.training_forward(self, None, payload.locked_task_ids)
            if training and bool(self.hat_trained.any()):
                raise RuntimeError(
                    f"training {type(self).__name__} with task_id=None would overwrite the weights of "
                    f"trained tasks {self.hat_trained.nonzero().flatten().tolist()}: pass the task id "
                    "of the task being learned (HATPayload(x, task_id=t, mask_scale=s))"
                )
            return payload.derive(compute(x, weight, bias))
        owned = None
        if training:  # Eq. 2 on weight and bias gradients; masks trained with clamped embeddings
            # Refused unless opted in (avalanche_hat.opt_ins): a trained task, a forgotten mask scale.
            trained = guard.flag_set(self, "hat_trained")
            opt_ins.check_trained_task(self, task_id, trained)
            opt_ins.check_mask_scale(self, task_id, scale)
            locked = guard.training_forward(self, task_id, payload.locked_task_ids, trained)
            if scale is not None:
                self.clamp_embedding_()
            guard.note_clean(self)
            owned, free = self._training_ownership(task_id, locked) if locked else self._training_ownership(task_id)
            in_owned = payload.ownership
            if in_owned is not None and (payload.mask_dim != in_axis % x.ndim or in_owned.numel() != in_units):
                in_owned = None  # the unit axis does not line up with this layer's inputs: stay safe
            guard.record_input_ownership(self, in_owned)
            if free and plain_when_free:
                return self._masked_output(payload, compute(x, weight, bias), task_id, scale, owned)
            if masked_nullified is not None and scale is not None:
                out, mask = masked_nullified(x, weight, bias, owned, in_owned, task_id, scale)
                return self._masked_output(payload, out, task_id, scale, owned, mask)
            if nullified is not None:
                out = nullified(x, weight, bias, owned, in_owned)
            else:
                weight = scale_grad(weight, nullification_factor(owned, in_owned, weight.ndim, groups))
                if bias is not None:
                    bias = scale_grad(bias, 1.0 - owned)
                out = compute(x, weight, bias)
        else:
            out = compute(x, weight, bias)
        return self._masked_output(payload, out, task_id, scale, owned)

    def _masked_output(self, payload, out, task_id: int, scale, owned, mask=None) -> HATPayload:
        """``out`` with the task's mask pending (recorded for the regulariser while training); the
        caller checked ``task_id``. ``mask``: the one the layer already computed, if any."""
        if mask is None:
            mask = self._mask(task_id, scale)
        if owned is not None and scale is not None:
            self._record(task_id, scale, mask, owned)
        return payload.derive(out, mask=mask, mask_dim=self.unit_dim % out.ndim, ownership=owned)

    def _record(self, task_id: int, scale: float, mask: torch.Tensor, owned: torch.Tensor) -> None:
        record = MASK_RECORD.get()
        if record is not None:
            record.setdefault(id(self), (task_id, scale, mask, owned))

    # ------------------------------------------------------------------------ forgetting
    def forgettable_units(self, task_id: int) -> torch.Tensor:
        """Indices of the units only ``task_id`` uses among the trained tasks: what :meth:`forget`
        re-initialises (every other trained task has them switched off)."""
        self.hat_config.check_task_id(task_id)
        exclusive = (self.binary_mask(task_id) > 0) & ~(self.ownership(task_id) > 0)
        return exclusive.nonzero().flatten()

    @torch.no_grad()
    def forget(self, task_id: int, dry_run: bool = False) -> int:
        """Re-initialise the units only ``task_id`` owns, give it the embeddings a fresh task gets
        (``HATConfig.mask_init``) and unmark it, so that it can be learned again; return the count of
        re-initialised weight and bias entries. Units other trained tasks use are not touched.
        ``dry_run``: only count, change nothing (no random number is drawn either)."""
        rows = self.forgettable_units(task_id)
        count = 0
        for name in ("weight", "bias"):
            param = getattr(self, name, None)
            if param is not None:
                count += int(rows.numel() * (param[0].numel() if param.ndim > 1 else 1))
        if dry_run:
            return count
        fresh = self._fresh_parameters()
        for name, value in fresh.items():
            param = getattr(self, name)
            if param is not None:
                param.data[rows] = value[rows].to(param.dtype)
        self.hat_config.init_embedding_(self.mask_embedding.data[task_id])
        self.hat_trained[task_id] = False
        self.hat_stepped[task_id] = False  # forgotten: its steps no longer block other tasks
        return count

    def _fresh_parameters(self) -> dict:
        """Freshly initialised ``weight``/``bias`` of the same layer (PyTorch's default init)."""
        clone = self.to_base_module()
        clone.reset_parameters()
        return {"weight": clone.weight, "bias": clone.bias}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_tasks={self.hat_config.num_tasks}"


class TaskIndexedModule(nn.Module):
    """A layer with one full copy per task plus one for ``task_id=None`` (index ``num_tasks``).

    Subclasses keep the copies in ``self.copies`` (an ``nn.ModuleList``)."""

    copies: nn.ModuleList
    hat_config: HATConfig

    def __init__(self) -> None:
        super().__init__()
        guard.register(self)

    def __getstate__(self):
        return guard.without_guard(super().__getstate__())

    def __setstate__(self, d):
        super().__setstate__(d)
        guard.register(self)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        guard.reset(self)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        guard.moved(self)  # .to(), .double(), ...: the reference is checked against the new tensors
        return out

    def copy_index(self, task_id: int | None) -> int:
        """The copy of ``task_id`` (``num_tasks`` for None). Every forward picks its copy here, so this
        is also where the guard sees the forward: it restores what an optimizer outside torch.optim
        wrote to the trained tasks' copies, and a training forward marks the copy as trained in this step
        (refused for a task the network marked trained, outside ``avalanche_hat.retraining``)."""
        index = self.task_index(task_id)
        guard.forward_start(self)
        if self.training and torch.is_grad_enabled():
            if task_id is not None:
                opt_ins.check_trained_task(self, task_id, guard.network_trained(self))
            guard.record_copy(self, task_id)
        elif self.training and task_id is not None and _tracks_statistics(self.copies[task_id]):
            # no gradient, but a training-mode norm still updates its running statistics in the forward
            opt_ins.check_statistics_forward(self, task_id, guard.network_trained(self))
            guard.record_copy(self, task_id)  # its statistics change in this step: kept, not restored
        return index

    def copy_for(self, task_id: int | None) -> nn.Module:
        return self.copies[self.copy_index(task_id)]

    def task_index(self, task_id: int | None) -> int:
        """The index of ``task_id``'s copy (``num_tasks`` for None) as a look-up, not a forward: no
        guard bookkeeping and no training-forward refusal."""
        self.hat_config.check_task_id(task_id)
        return self.hat_config.num_tasks if task_id is None else task_id

    def task_copy(self, task_id: int | None):
        """The copy of ``task_id`` as a look-up (export, forgetting, task inference), not a forward."""
        return self.copies[self.task_index(task_id)]

    @torch.no_grad()
    def forget(self, task_id: int, dry_run: bool = False) -> int:
        """Reset the copy of ``task_id`` (parameters and running statistics, as a fresh copy); return
        how many parameters were re-initialised. ``dry_run``: only count, change nothing."""
        copy = self.task_copy(task_id)
        if dry_run:
            return sum(p.numel() for p in copy.parameters())
        for m in copy.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
        return sum(p.numel() for p in copy.parameters())

    def to_base_module(self, task_id: int | None = None) -> nn.Module:
        """A plain copy of the layer of ``task_id`` (None: the plain network's copy)."""
        import copy

        return copy.deepcopy(self.task_copy(task_id))


def _tracks_statistics(copy) -> bool:
    """Whether a training-mode forward of ``copy`` updates buffers (a BatchNorm's running statistics)."""
    return bool(getattr(copy, "track_running_stats", False)) and getattr(copy, "running_mean", None) is not None
