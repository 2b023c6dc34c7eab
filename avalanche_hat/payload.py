"""HATPayload: a tensor travelling through a HAT network with its task id, mask scale, the mask of
the last HAT layer (applied lazily) and which of its units earlier tasks own."""
from __future__ import annotations

import contextlib
import inspect
import math
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch import nn

from .mechanism import fused
from .mechanism.masks import _as

# Modules that map 0 to 0 unit by unit and keep the unit axis: units that earlier tasks do not own
# stay exactly 0 through them, so the ownership of the units carries over (for the input side of
# Eq. 2). Anything else drops it, and the next HAT layer counts all of its inputs as owned (safe).
ZERO_PRESERVING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardtanh, nn.Hardswish,
    nn.Mish, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
# Of those, the modules through which a non-negative per-unit mask commutes (f(m x) = m f(x) for
# m >= 0): the mask can stay pending and be applied later, on a smaller tensor or folded into the
# affine parameters of a task-indexed norm.
MASK_COMMUTING = (
    nn.ReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)


# Plain normalisation layers: run on a task's payload, whatever state they hold (affine parameters,
# running statistics) is shared by every task, so training a later task would change it under the
# earlier ones. ``forward_by`` refuses those that hold such state (see ``_shared_norm_state``).
PLAIN_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _shared_norm_state(module) -> list[str]:
    """Names of the trainable parameters and running statistics of a plain norm (empty otherwise).

    Empty too for a plain norm the HATPlugin freezes after the first task (``plain_parameters="freeze"``
    tags it ``hat_frozen_after_first_task``): it is shared by choice and kept fixed by the plugin."""
    if not isinstance(module, PLAIN_NORMS) or getattr(module, "hat_frozen_after_first_task", False):
        return []
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    if getattr(module, "track_running_stats", False):
        names += [n for n, b in module.named_buffers() if b is not None]
    return names


def _task_indexed_hint(module) -> str:
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return (f"Use avalanche_hat.modules.TaskIndexedGroupNorm({module.num_features}, {module.num_features}, "
                "hat_config) instead (one group per channel is an instance norm; one copy per task)")
    if isinstance(module, nn.RMSNorm):
        return "avalanche_hat has no task-indexed RMSNorm: use TaskIndexedLayerNorm (one copy per task) instead"
    return ("Replace it with its task-indexed counterpart (one copy per task): "
            "avalanche_hat.modules.from_base_module(norm, hat_config)")


def _along(vector: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """View a per-unit vector so that it broadcasts along axis ``dim`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[dim] = vector.numel()
    return vector.view(shape)

# The autograd nodes of the masked outputs (``HATPayload.data``) computed inside watch_masked_outputs().
_MASKED_OUTPUTS: ContextVar["list | None"] = ContextVar("avalanche_hat_masked_outputs", default=None)
# Autograd nodes that only copy, index, join or reshape: a tensor built through them from a HAT
# layer's masked output (as Avalanche's MultiTaskModule copies each task's output into one tensor)
# still is that output.
_COPY_NODES = frozenset({
    "IndexPutBackward0", "CopySlices", "CatBackward0", "StackBackward0", "SliceBackward0", "SelectBackward0",
    "IndexBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0",
    "CloneBackward0", "ToCopyBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "ExpandBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0",
    "SplitBackward0", "SplitWithSizesBackward0", "NarrowBackward0",
})


def _hat_kind(module) -> str | None:
    """How ``forward_by`` runs ``module`` for a task: ``None`` (no HAT layers: on the data),
    ``"payload"`` (it takes the payload), ``"sequential"`` (each child in turn), ``"keywords"``
    (``forward(x, task_id=, mask_scale=)``) or ``"unknown"`` (has HAT layers, cannot be told the task)."""
    if not isinstance(module, nn.Module):
        return None
    from .modules.base import HATModule, TaskIndexedModule  # here: modules.base imports this file

    if isinstance(module, (HATModule, TaskIndexedModule)) or getattr(type(module), "takes_hat_payload", False):
        return "payload"
    if not any(isinstance(m, (HATModule, TaskIndexedModule)) for m in module.modules()):
        return None
    if type(module) is nn.Sequential:
        return "sequential"
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "unknown"
    return "keywords" if {"task_id", "mask_scale"} <= set(params) else "unknown"


def _locks(task_ids):
    if not task_ids:
        return contextlib.nullcontext()
    from .guard import locked_tasks

    return locked_tasks(*task_ids)


class HATPayload:
    """A tensor plus what HAT needs to know about it.

    Args:
        data: the tensor.
        task_id: the task whose masks to use; ``None`` runs the plain network (no mask, the shared
            copy of task-indexed layers, nothing frozen).
        mask_scale: ``s`` of Eq. 1 (training); ``None`` gives binary masks (inference).
        locked_task_ids: tasks to protect in this forward (and the optimizer step after it) as if
            they were marked trained, without marking them (HAT-CL's ``locked_task_ids``); every
            payload derived from this one carries them. :func:`avalanche_hat.locked_tasks` does the
            same for a block of code (including task-indexed heads called on a bare tensor).

    ``.data`` is the tensor with the pending mask applied. HAT layers keep their mask pending so
    that a task-indexed norm can normalise the unmasked output and fold the mask into its affine
    parameters, and so that ReLU, pooling and dropout run before the (then smaller) multiply.
    Shape operations and ``+`` keep track of the mask and of the ownership of the units; a residual
    add applies each operand's mask exactly once.
    """

    __slots__ = ("_data", "task_id", "mask_scale", "_mask", "mask_dim", "ownership", "locked_task_ids")

    def __init__(
        self,
        data: torch.Tensor,
        task_id: int | None = None,
        mask_scale: float | None = None,
        *,
        mask: torch.Tensor | None = None,
        mask_dim: int | None = None,
        ownership: torch.Tensor | None = None,
        locked_task_ids=None,
    ) -> None:
        if isinstance(data, HATPayload):
            raise TypeError("HATPayload wraps a tensor, not another HATPayload")
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"HATPayload wraps a torch.Tensor, got {type(data).__name__}")
        if mask_scale is not None:
            if task_id is None:
                raise ValueError(
                    "a mask_scale needs a task_id: HATPayload(x, task_id=t, mask_scale=s); "
                    "mask_scale=None with task_id=None runs the plain network"
                )
            mask_scale = float(mask_scale)
            if not (mask_scale >= 0 and math.isfinite(mask_scale)):
                raise ValueError(f"mask_scale must be a finite number >= 0 or None, got {mask_scale}")
        if (mask is not None or ownership is not None) and mask_dim is None:
            raise ValueError("a mask or an ownership vector needs the mask_dim it lies along")
        if mask_dim is not None:
            if not -data.ndim <= mask_dim < data.ndim:
                raise ValueError(f"mask_dim {mask_dim} is out of range for a {data.ndim}-d tensor")
            mask_dim %= data.ndim
            units = data.shape[mask_dim]
            for name, vector in (("mask", mask), ("ownership", ownership)):
                if vector is not None and vector.numel() != units:
                    raise ValueError(
                        f"mismatched mask dimension: the {name} has {vector.numel()} units but "
                        f"axis {mask_dim} of the data has {units} (shape {tuple(data.shape)})"
                    )
        locked = frozenset()
        if locked_task_ids is not None and not isinstance(locked_task_ids, frozenset):
            from .guard import as_locked_ids

            locked = as_locked_ids(locked_task_ids)
        elif locked_task_ids:
            locked = locked_task_ids
        if locked and task_id in locked:
            raise ValueError(f"task {task_id} cannot be locked in its own forward: a locked task cannot "
                             f"learn (locked_task_ids={sorted(locked)})")
        if locked and task_id is None:
            raise ValueError("locked_task_ids needs a task_id: the plain network (task_id=None) protects no task")
        self._data = data
        self.task_id = task_id
        self.mask_scale = mask_scale
        self._mask = mask
        self.mask_dim = mask_dim
        self.ownership = ownership
        self.locked_task_ids = locked

    # ----------------------------------------------------------------------------------- access
    @property
    def data(self) -> torch.Tensor:
        """The tensor with the pending mask applied."""
        if self._mask is None:
            return self._data
        data, mask = self._data, _as(self._mask, self._data.dtype)
        kernels = fused.usable(data, mask) if self.mask_dim == data.ndim - 1 else None
        if kernels is not None:  # one pass each way; its backward yields both gradients in one pass
            out = kernels.mask_last_axis(data, mask)
        else:
            out = data * _along(mask, self.mask_dim, data.ndim)
        out._hat_masked_output = True  # a HAT layer's masked output: see check_network_output
        watched = _MASKED_OUTPUTS.get()
        if watched is not None and out.grad_fn is not None:
            watched.append(out.grad_fn)
        return out

    @property
    def unmasked_data(self) -> torch.Tensor:
        """The tensor before the pending mask (what a task-indexed norm normalises)."""
        return self._data

    @property
    def pending_mask(self) -> torch.Tensor | None:
        return self._mask

    @property
    def shape(self) -> torch.Size:
        return self._data.shape

    @property
    def ndim(self) -> int:
        return self._data.ndim

    @property
    def device(self) -> torch.device:
        return self._data.device

    @property
    def dtype(self) -> torch.dtype:
        return self._data.dtype

    def size(self, dim: int | None = None):
        return self._data.size() if dim is None else self._data.size(dim)

    def dim(self) -> int:
        return self._data.ndim

    def __repr__(self) -> str:
        return (
            f"HATPayload(shape={tuple(self._data.shape)}, task_id={self.task_id}, "
            f"mask_scale={self.mask_scale}, pending_mask={self._mask is not None}, mask_dim={self.mask_dim})"
        )

    # ------------------------------------------------------------------------------ derivation
    def derive(
        self,
        data: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        mask_dim: int | None = None,
        ownership: torch.Tensor | None = None,
    ) -> "HATPayload":
        """A payload for ``data`` with this task id and scale; mask and ownership as given (none by default)."""
        return HATPayload(
            data, self.task_id, self.mask_scale, mask=mask, mask_dim=mask_dim, ownership=ownership,
            locked_task_ids=self.locked_task_ids,
        )

    def forward_by(self, module: Callable[[torch.Tensor], torch.Tensor], *args, **kwargs) -> "HATPayload":
        """Run ``module`` on this payload and return the result as a payload of the same task.

        A module without HAT layers (activation, pooling, dropout, ...) runs on the data: through
        ReLU, pooling and dropout the mask stays pending; through other zero-preserving activations
        the ownership of the units carries over; anything else drops it.

        A module with HAT layers runs for this payload's task, never as the plain network: a HAT
        layer, a task-indexed layer or a HAT network (``avalanche_hat.timm_models``) takes the
        payload itself; an ``nn.Sequential`` runs each of its modules through ``forward_by``; a
        module whose ``forward`` takes ``task_id`` and ``mask_scale`` gets them with the data. Any
        other module with HAT layers is refused with a ``TypeError`` (its forward cannot be told the
        task): call it with the payload, ``module(payload)``.

        A plain norm that holds trainable parameters or running statistics is refused for a task's
        payload (every task would share that state, and later tasks would train it): use its
        task-indexed counterpart (``avalanche_hat.modules.from_base_module``). A norm without state
        (``elementwise_affine=False``, ``affine=False``) is fine: it gets the masked data, whose
        switched-off units are exact zeros.
        """
        kind = _hat_kind(module)
        if kind is not None:
            return self._forward_by_hat(module, kind, args, kwargs)
        if self.task_id is not None:
            state = _shared_norm_state(module)
            if state:
                raise TypeError(
                    f"a plain {type(module).__name__} in the forward of task {self.task_id} would be shared by "
                    f"every task: its {', '.join(state)} would be trained by later tasks and change the outputs "
                    f"of trained ones. {_task_indexed_hint(module)}, and call it as norm(payload); or use a norm "
                    f"without trainable parameters or running statistics"
                )
        if isinstance(module, MASK_COMMUTING) and self._mask is not None and not args and not kwargs:
            out = module(self._data)
            if out.ndim == self._data.ndim and out.shape[self.mask_dim] == self._data.shape[self.mask_dim]:
                return self.derive(out, mask=self._mask, mask_dim=self.mask_dim, ownership=self.ownership)
        out = module(self.data, *args, **kwargs)
        if (
            isinstance(module, ZERO_PRESERVING)
            and self.ownership is not None
            and out.ndim == self._data.ndim
            and out.shape[self.mask_dim] == self._data.shape[self.mask_dim]
        ):
            return self.derive(out, mask_dim=self.mask_dim, ownership=self.ownership)
        return self.derive(out)

    def _forward_by_hat(self, module, kind: str, args, kwargs) -> "HATPayload":
        """``forward_by`` for a module with HAT layers (see there): run it for this payload's task."""
        name = type(module).__name__
        if kind == "sequential":
            if args or kwargs:
                raise TypeError(f"forward_by({name}) with HAT layers takes no extra arguments")
            out = self
            for child in module:
                out = out.forward_by(child)
            return out
        if kind == "payload":
            out = module(self, *args, **kwargs)
        elif kind == "keywords":
            clash = {"task_id", "mask_scale"} & set(kwargs)
            if clash:
                raise TypeError(
                    f"forward_by({name}) passes the payload's task_id and mask_scale itself; "
                    f"do not pass {sorted(clash)}"
                )
            with _locks(self.locked_task_ids):  # the module builds its own payload: the locks go with it
                out = module(self.data, *args, task_id=self.task_id, mask_scale=self.mask_scale, **kwargs)
        else:
            raise TypeError(
                f"forward_by({name}): {name} has HAT layers but its forward takes neither a HATPayload "
                "(as HAT layers and avalanche_hat.timm_models networks do) nor task_id and mask_scale "
                "keywords, so it cannot be run for this payload's task (it would run as the plain "
                f"network). Call it with the payload instead, {name.lower()}(payload), or give its "
                "forward the signature forward(x, task_id=None, mask_scale=None)"
            )
        if isinstance(out, HATPayload):
            if out.task_id != self.task_id or out.mask_scale != self.mask_scale:
                raise RuntimeError(
                    f"forward_by({name}) returned a payload of task {out.task_id} (mask_scale "
                    f"{out.mask_scale}) for an input of task {self.task_id} (mask_scale {self.mask_scale})"
                )
            return out
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"forward_by({name}) returned {type(out).__name__}, not a tensor or a HATPayload")
        return self.derive(out)

    # ------------------------------------------------------------------------- shape operations
    def _moved(self, data: torch.Tensor, mask_dim: int | None, repeat: int = 1) -> "HATPayload":
        """Payload for ``data`` whose unit axis is now ``mask_dim`` (``None``: lost), each unit repeated."""
        if mask_dim is None:
            return self.derive(data)

        def move(vector):
            if vector is None:
                return None
            return vector.repeat_interleave(repeat) if repeat > 1 else vector

        return self.derive(data, mask=move(self._mask), mask_dim=mask_dim, ownership=move(self.ownership))

    def _tracks_units(self) -> bool:
        return self._mask is not None or self.ownership is not None

    def reshape(self, *shape) -> "HATPayload":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        if not self._tracks_units():
            return self.derive(self._data.reshape(*shape))
        # Apply the mask lazily only if the unit axis survives; otherwise materialise it first.
        data = self._data.reshape(*shape)
        new_dim, repeat = self._unit_axis_after_reshape(tuple(data.shape))
        if new_dim is None:
            return self.derive(self.data.reshape(*shape))
        return self._moved(data, new_dim, repeat)

    view = reshape

    def _unit_axis_after_reshape(self, new_shape: tuple) -> tuple[int | None, int]:
        old = tuple(self._data.shape)
        k = self.mask_dim
        before = math.prod(old[:k])
        units = old[k]
        prefix = 1
        for j, size in enumerate(new_shape):
            if prefix == before:
                if size == units:
                    return j, 1
                # The unit axis merged with the axes that follow it (flatten): unit u now spans
                # prod(old[k+1:m]) consecutive positions.
                span = 1
                for m in range(k + 1, len(old) + 1):
                    if size == units * span:
                        return j, span
                    if m < len(old):
                        span *= old[m]
                if size != 1:  # a size-1 axis (a batch of one) leaves the prefix as it is
                    return None, 1
            prefix *= size
            if prefix > before:
                return None, 1
        return None, 1

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> "HATPayload":
        shape = list(self._data.shape)
        start, end = start_dim % len(shape), end_dim % len(shape)
        merged = math.prod(shape[start : end + 1])
        return self.reshape(*shape[:start], merged, *shape[end + 1 :])

    def permute(self, *dims) -> "HATPayload":
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        data = self._data.permute(*dims)
        if not self._tracks_units():
            return self.derive(data)
        dims = [d % self._data.ndim for d in dims]
        return self._moved(data, dims.index(self.mask_dim))

    def transpose(self, dim0: int, dim1: int) -> "HATPayload":
        data = self._data.transpose(dim0, dim1)
        if not self._tracks_units():
            return self.derive(data)
        dim0, dim1 = dim0 % self._data.ndim, dim1 % self._data.ndim
        new = {dim0: dim1, dim1: dim0}.get(self.mask_dim, self.mask_dim)
        return self._moved(data, new)

    # ------------------------------------------------------------------------------ arithmetic
    def _check_same_task(self, other: "HATPayload") -> None:
        if other.task_id != self.task_id or other.mask_scale != self.mask_scale:
            raise ValueError(
                f"cannot combine payloads of task {self.task_id} (scale {self.mask_scale}) and task "
                f"{other.task_id} (scale {other.mask_scale})"
            )

    def __add__(self, other) -> "HATPayload":
        if isinstance(other, HATPayload):
            self._check_same_task(other)
            data = self.data + other.data  # each operand's mask applied exactly once
            if (
                self.ownership is not None
                and other.ownership is not None
                and self.mask_dim == other.mask_dim
                and data.shape == self._data.shape
            ):
                # A unit of the sum is zero for an earlier task only if it is zero in both operands.
                return self.derive(data, mask_dim=self.mask_dim, ownership=torch.maximum(self.ownership, other.ownership))
            return self.derive(data)
        # Adding a tensor (e.g. a position embedding) makes unowned units non-zero: ownership is lost.
        return self.derive(self.data + other)

    __radd__ = __add__

    def __mul__(self, other) -> "HATPayload":
        if isinstance(other, HATPayload):
            self._check_same_task(other)
            return self.derive(self.data * other.data)
        if isinstance(other, (int, float)):
            # A scalar multiple keeps zeros at zero and commutes with the mask.
            return self.derive(
                self._data * other, mask=self._mask, mask_dim=self.mask_dim, ownership=self.ownership
            ) if self._tracks_units() else self.derive(self._data * other)
        return self.derive(self.data * other)

    __rmul__ = __mul__

    def __matmul__(self, other) -> "HATPayload":
        if isinstance(other, HATPayload):
            self._check_same_task(other)
            other = other.data
        return self.derive(self.data @ other)

    def __rmatmul__(self, other) -> "HATPayload":
        return self.derive(other @ self.data)

    @staticmethod
    def cat(payloads: "list[HATPayload]", dim: int = 0) -> "HATPayload":
        """Concatenate payloads of one task along ``dim``; ownership survives if ``dim`` is not the unit axis."""
        first = payloads[0]
        for p in payloads[1:]:
            first._check_same_task(p)
        data = torch.cat([p.data for p in payloads], dim=dim)
        dims = {p.mask_dim for p in payloads}
        if all(p.ownership is not None for p in payloads) and len(dims) == 1 and dim % data.ndim != first.mask_dim:
            owned = payloads[0].ownership
            for p in payloads[1:]:
                owned = torch.maximum(owned, p.ownership)
            return first.derive(data, mask_dim=first.mask_dim, ownership=owned)
        return first.derive(data)


@contextlib.contextmanager
def watch_masked_outputs() -> Iterator[list]:
    """Record the HAT layers' masked outputs computed in the block, for
    ``check_network_output(output, watched)`` on an output that was copied after the network (as
    Avalanche's ``MultiTaskModule.forward`` does with each task's output)."""
    watched: list = []
    token = _MASKED_OUTPUTS.set(watched)
    try:
        yield watched
    finally:
        _MASKED_OUTPUTS.reset(token)


def _copied_from(output: torch.Tensor, watched: list, limit: int = 64) -> bool:
    """Whether ``output`` is one of the ``watched`` autograd nodes' tensors, through copy nodes only."""
    targets = {id(node) for node in watched}
    stack, seen = [output.grad_fn], 0
    while stack and seen < limit:
        node = stack.pop()
        seen += 1
        if node is None:
            continue
        if id(node) in targets:
            return True
        if type(node).__name__ in _COPY_NODES:
            stack.extend(f for f, _ in node.next_functions)
    return False


def check_network_output(output, watched: list | None = None) -> None:
    """Refuse a network whose output is a HAT layer's masked output (a ``HATLinear`` as the classifier).

    The usage penalty drives a task's masks towards using as few units as it needs; on an output
    layer those units are the classes, so it switches them off, the logits go to 0 and the task
    learns nothing (cross entropy stays at log(classes)). Raises ``ValueError`` saying what to use
    instead. The HAT plugin calls it on every training minibatch's output; call it on your network's
    output in a loop of your own. ``watched``: what :func:`watch_masked_outputs` recorded during the
    forward, to also recognise the output after copies (indexing, ``torch.cat``, reshapes).
    """
    if isinstance(output, HATPayload):
        output = output.data if output.pending_mask is not None else output.unmasked_data
    if not isinstance(output, torch.Tensor):
        return
    if getattr(output, "_hat_masked_output", False) or (watched and _copied_from(output, watched)):
        raise ValueError(
            "the network's output is the masked output of a HAT layer (e.g. HATLinear as the classifier): "
            "HAT's usage penalty switches its units off, so the logits go to 0 and no task can learn. "
            "End the network with a layer HAT does not mask: one head per task, "
            "TaskIndexedLinear(in_features, num_classes, hat_config), or a plain nn.Linear shared by "
            "all tasks (or wrap a backbone of HAT layers in avalanche_hat.HATMultiTaskModel, which adds "
            "per-task heads)"
        )
