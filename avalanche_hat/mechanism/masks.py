"""Masks, ownership and the two autograd pieces of HAT.

Paper notation: the mask of task ``t`` at layer ``l`` is ``a = sigmoid(s * e)`` (Eq. 1); the units
earlier tasks own are the cumulative max of their binary masks (Eq. 2); weight ``w_ij`` is trained
with gradient ``g * (1 - min(a_i^{<t}, a_j^{<t}))`` (Eq. 2); the embedding gradient is compensated
(Eq. 3).
"""
from __future__ import annotations

import math

import torch

from . import fused


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without the dispatch when it already has it (these run every step)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class _SoftMask(torch.autograd.Function):
    """``a = sigmoid(s * e)`` whose backward is the compensated gradient of Eq. 3.

    Eq. 3 multiplies the embedding gradient ``q = s * sigmoid'(s e) * dL/da`` by
    ``s_max (cosh(s e) + 1) / (s (cosh(e) + 1))``. Since ``sigmoid'(x) = 1 / (2 (cosh(x) + 1))``
    the product is ``dL/da * s_max / (2 (cosh(e) + 1))``: no huge intermediate, finite in float16 and
    bfloat16, and defined at ``s = 0``, where the cosine schedule passes mid-unit.

    The original code clamps ``s e`` to ``[-c, c]`` (c = 50) inside ``cosh(s e)``; beyond it the
    factor is ``(cosh(c) + 1) / (cosh(s e) + 1) = exp(c - |s e|)`` (to within ``e^-c``), so a
    saturated mask stops training. That is what lets a high scale hold the masks still while the
    weights train (the first phase of the cosine schedule). ``saturation=None`` drops the clamp.
    """

    @staticmethod
    def forward(ctx, embedding: torch.Tensor, scale: float, max_scale: float, saturation: float | None) -> torch.Tensor:
        ctx.save_for_backward(embedding)
        ctx.scale, ctx.max_scale, ctx.saturation = scale, max_scale, saturation
        return torch.sigmoid(embedding * scale)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):
        (embedding,) = ctx.saved_tensors
        return compensated_grad(grad_mask, embedding, ctx.scale, ctx.max_scale, ctx.saturation), None, None, None


def compensated_grad(grad_mask, embedding, scale: float, max_scale: float, saturation: float | None):
    """``dL/de`` of Eq. 3 from ``dL/da``: ``dL/da * s_max / (2 (cosh(e) + 1))``, times
    ``exp(min(0, saturation - |s e|))`` (the original code's clamp). Few in-place operations: this
    runs in every training step of every HAT layer."""
    work = torch.promote_types(embedding.dtype, torch.float32)  # half precision computes in float32
    e = _as(embedding.detach(), work).abs()
    denominator = torch.cosh(e).add_(1.0)
    if saturation is None:
        grad = _as(grad_mask, work).mul(0.5 * max_scale)
    else:  # s_max / 2 joins the clamp's exponent: one exp for both
        grad = e.mul_(-scale).add_(saturation).clamp_max_(0.0).add_(math.log(0.5 * max_scale)).exp_()
        grad.mul_(grad_mask)
    return _as(grad.div_(denominator), embedding.dtype)


def soft_mask(
    embedding: torch.Tensor, scale: float, max_scale: float, compensate: bool = True, saturation: float | None = 50.0
) -> torch.Tensor:
    """The training mask ``sigmoid(scale * embedding)``; with ``compensate`` its gradient follows Eq. 3
    (with the original code's clamp of ``s e`` at ``saturation``)."""
    if compensate:
        return _SoftMask.apply(embedding, float(scale), float(max_scale), saturation)
    return torch.sigmoid(embedding * float(scale))


def binary_mask(embedding: torch.Tensor) -> torch.Tensor:
    """The inference mask: ``sigmoid(s e)`` as ``s -> inf``, i.e. 1 where ``e > 0`` and 0 elsewhere."""
    return (embedding.detach() > 0).to(embedding.dtype)


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by a (broadcast) factor in the backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(factor)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (factor,) = ctx.saved_tensors
        return grad * _as(factor, grad.dtype), None


def scale_grad(tensor: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` unchanged, with its gradient multiplied by ``factor`` (broadcast to its shape)."""
    return _ScaleGrad.apply(tensor, factor)


def _owned_rows(out_owned: torch.Tensor) -> torch.Tensor:
    return (out_owned > 0).nonzero().squeeze(1)


def _clear_owned_rows_(grad_w: torch.Tensor, rows: torch.Tensor, in_owned: torch.Tensor | None) -> torch.Tensor:
    """Eq. 2 by index: zero the given owned rows where their input is owned (all of each row when
    input ownership is unknown); exact zeros whatever the gradient holds."""
    if rows.numel() == 0:
        return grad_w
    if in_owned is None:
        return grad_w.index_fill_(0, rows, 0.0)
    return grad_w.index_copy_(0, rows, grad_w.index_select(0, rows).masked_fill_(in_owned > 0, 0.0))


def nullify_linear_grad_(grad_w: torch.Tensor, out_owned: torch.Tensor, in_owned: torch.Tensor | None,
                         by_index: bool | None = None) -> torch.Tensor:
    """Eq. 2 on a linear weight gradient ``(out, in)``, in place, with no weight-sized temporary
    in floating point: rows of owned outputs are zeroed where their input is owned too (all of
    the row when the input ownership is unknown).

    ``by_index`` (default: on the CPU, where reading an index list costs no device synchronisation)
    touches only the owned rows, and nothing at all when no unit is owned yet; otherwise one masked
    pass over the gradient keeps the step free of host round trips."""
    if grad_w.device.type == "cpu" if by_index is None else by_index:
        return _clear_owned_rows_(grad_w, _owned_rows(out_owned), in_owned)
    if in_owned is None:
        return grad_w.mul_(_as(1.0 - out_owned, grad_w.dtype).unsqueeze(1))
    return grad_w.masked_fill_((out_owned > 0).unsqueeze(1) & (in_owned > 0).unsqueeze(0), 0.0)


def _nullified_weight_grad(grad2d: torch.Tensor, x2d: torch.Tensor, out_owned: torch.Tensor,
                           in_owned: torch.Tensor | None, by_index: bool | None = None) -> torch.Tensor:
    """``grad2d^T x2d`` with Eq. 2 applied: the weight gradient of ``F.linear``. ``by_index`` as
    in :func:`nullify_linear_grad_`."""
    if grad2d.device.type == "cpu" if by_index is None else by_index:
        rows = _owned_rows(out_owned)
        many = rows.numel() and 3 * rows.numel() >= out_owned.numel()
        if many and (in_owned is None or not bool((in_owned == 0).any())):  # whole rows frozen
            # Owned output units have whole rows frozen. Once they are a large share of the layer,
            # skipping their part of the product saves more than the scatter into a zeroed gradient
            # costs (1024x1024 weight, batch 32 to 512: it pays from about a third of the rows on).
            free = (out_owned <= 0).nonzero().squeeze(1)
            grad_w = grad2d.new_zeros(grad2d.shape[1], x2d.shape[1])
            if free.numel():
                grad_w.index_copy_(0, free, grad2d.index_select(1, free).t().mm(x2d))
            return grad_w
        return _clear_owned_rows_(grad2d.t().mm(x2d), rows, in_owned)
    if in_owned is None and grad2d.shape[0] < x2d.shape[1]:
        # Whole rows are frozen: scaling the (samples x out) output gradient is cheaper than
        # a pass over the (out x in) weight gradient when there are fewer samples than inputs.
        return (grad2d * _as(1.0 - out_owned, grad2d.dtype)).t().mm(x2d)
    return nullify_linear_grad_(grad2d.t().mm(x2d), out_owned, in_owned, by_index=False)


def _nullified_linear_grads(ctx, grad, x, weight, out_owned, in_owned):
    """Input, weight and bias gradients of ``F.linear``, the last two with Eq. 2 applied."""
    grad_x = grad_w = grad_b = None
    dtype = grad.dtype  # under autocast the saved tensors may be in another precision
    if ctx.needs_input_grad[0]:
        grad_x = _as(grad.matmul(_as(weight, dtype)), x.dtype)
    grad2d = grad.reshape(-1, grad.shape[-1])
    if ctx.needs_input_grad[1]:
        x2d = _as(x.reshape(-1, x.shape[-1]), dtype)
        grad_w = _as(_nullified_weight_grad(grad2d, x2d, out_owned, in_owned), weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = _as(grad2d.sum(0).mul_(_as(1.0 - out_owned, dtype)), weight.dtype)
    return grad_x, grad_w, grad_b


class _NullifiedLinear(torch.autograd.Function):
    """``F.linear`` whose weight and bias gradients follow Eq. 2.

    It computes the weight gradient itself and nullifies it in place (a buffer it owns), and keeps
    only the two ownership vectors from forward to backward: training costs no weight-sized
    temporary; the input gradient is untouched.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, out_owned, in_owned):
        ctx.save_for_backward(x, weight, out_owned, in_owned)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, out_owned, in_owned = ctx.saved_tensors
        return *_nullified_linear_grads(ctx, grad, x, weight, out_owned, in_owned), None, None


def nullified_linear(x, weight, bias, out_owned, in_owned):
    """``F.linear(x, weight, bias)`` with Eq. 2 applied to the weight and bias gradients, given the
    0/1 ownership of the output units and of the inputs (``None``: unknown, all count as owned)."""
    return _NullifiedLinear.apply(x, weight, bias, out_owned, in_owned)


class _MaskedNullifiedLinear(torch.autograd.Function):
    """One autograd node for a HAT linear layer's training step: ``F.linear`` with Eq. 2 on the
    weight and bias gradients, and the task's soft mask ``sigmoid(s e_t)`` (Eq. 1) with its
    compensated gradient (Eq. 3). Returns ``(output, mask)``; the mask stays pending on the payload.
    The same arithmetic as :func:`nullified_linear` plus :func:`soft_mask`, with one node instead of
    three (the mask, the row of the embedding, the layer): a layer's fixed cost per step is small
    operations and their bookkeeping."""

    @staticmethod
    def forward(ctx, x, weight, bias, embedding, out_owned, in_owned, task_id, scale, max_scale, compensate, saturation):
        kernels = fused.usable(embedding) if compensate else None
        if kernels is not None:  # the same loop as the layer's other paths (see HATModule._mask)
            mask = kernels.soft_mask(embedding, task_id, scale, max_scale, *fused.saturation_args(saturation))
        else:
            mask = torch.sigmoid(embedding[task_id] * scale)
        ctx.save_for_backward(x, weight, out_owned, in_owned, embedding, mask)
        ctx.has_bias = bias is not None
        ctx.hat = (task_id, scale, max_scale, compensate, saturation)
        return torch.nn.functional.linear(x, weight, bias), mask

    @staticmethod
    def backward(ctx, grad, grad_mask):
        x, weight, out_owned, in_owned, embedding, mask = ctx.saved_tensors
        grad_x, grad_w, grad_b = _nullified_linear_grads(ctx, grad, x, weight, out_owned, in_owned)
        grad_e = None
        if ctx.needs_input_grad[3]:
            task_id, scale, max_scale, compensate, saturation = ctx.hat
            kernels = fused.usable(embedding) if compensate else None
            if kernels is not None:
                grad_e = kernels.compensated_embedding_grad(grad_mask, embedding, task_id, scale, max_scale,
                                                            *fused.saturation_args(saturation))
            else:
                if compensate:
                    row = compensated_grad(grad_mask, embedding[task_id], scale, max_scale, saturation)
                else:
                    row = grad_mask * mask * (1.0 - mask) * scale
                grad_e = torch.zeros_like(embedding)
                grad_e[task_id] = row
        return grad_x, grad_w, grad_b, grad_e, None, None, None, None, None, None, None


def masked_nullified_linear(x, weight, bias, embedding, out_owned, in_owned, task_id: int, scale: float,
                            max_scale: float, compensate: bool = True, saturation: float | None = 50.0):
    """``(F.linear(x, weight, bias), sigmoid(scale * embedding[task_id]))`` in one autograd node, with
    Eq. 2 on the weight and bias gradients and Eq. 3 on the embedding's (see :func:`soft_mask`).
    On the CPU the fused kernels' version of the node does the same operations without the
    interpreter's work (same bits)."""
    kernels = fused.usable(embedding, weight) if compensate else None
    if kernels is not None and x.dtype == weight.dtype and x.is_cpu and not torch.is_autocast_enabled("cpu"):
        out, mask = kernels.masked_nullified_linear(x, weight, bias, embedding, out_owned, in_owned, task_id,
                                                    float(scale), float(max_scale), *fused.saturation_args(saturation))
        return out, mask
    return _MaskedNullifiedLinear.apply(x, weight, bias, embedding, out_owned, in_owned, task_id, float(scale),
                                        float(max_scale), compensate, saturation)


def protecting_tasks(trained: torch.Tensor, task_id: int | None) -> list[int]:
    """The trained tasks other than ``task_id``, whose units Eq. 2 protects (reads ``trained`` on the host)."""
    return [t for t, done in enumerate(trained.tolist()) if done and t != task_id]


def owned_by(embedding: torch.Tensor, tasks: list[int]) -> torch.Tensor:
    """0/1 per unit: switched on by at least one of ``tasks`` (no work at all for none)."""
    if not tasks:
        return embedding.new_zeros(embedding.shape[1])
    if len(tasks) == 1:  # the common case (task 1 after task 0): a row, no gather
        return (embedding.detach()[tasks[0]] > 0).to(embedding.dtype)
    # a cached index (a list index is converted on every call) and a sum, cheaper than any() over rows
    rows = embedding.detach().index_select(0, _task_index(tasks, embedding.device))
    return (rows > 0).sum(0).gt_(0).to(embedding.dtype)


_TASK_INDEX: dict = {}


def _task_index(tasks: list[int], device) -> torch.Tensor:
    key = (tuple(tasks), device)
    index = _TASK_INDEX.get(key)
    if index is None:
        if len(_TASK_INDEX) > 256:
            _TASK_INDEX.clear()
        index = _TASK_INDEX[key] = torch.tensor(tasks, dtype=torch.long, device=device)
    return index


def ownership(embedding: torch.Tensor, trained: torch.Tensor, task_id: int | None,
              by_list: bool | None = None) -> torch.Tensor:
    """Units owned by the trained tasks other than ``task_id``: ``max_{t' != t} 1[e^{t'} > 0]``.

    ``embedding`` is ``(num_tasks, units)``, ``trained`` a bool vector of ``num_tasks``. The result is
    a 0/1 vector in the embedding's dtype. Sequential training (tasks ``0..t-1`` trained) gives the
    paper's ``a^{<t}``; retraining task ``t`` later protects every other trained task.
    """
    if trained.device.type == "cpu" if by_list is None else by_list:
        # Reading the flags into a list costs no device synchronisation on the CPU: a task's first
        # units need no work at all, later ones only the rows of the protecting tasks.
        return owned_by(embedding, protecting_tasks(trained, task_id))
    if task_id is None:
        protected = trained
    else:
        protected = trained.clone()
        protected[task_id] = False
    # A product with the 0/1 matrix of switched-on units counts the protecting tasks of each unit.
    on = (embedding.detach() > 0).to(embedding.dtype)
    return torch.mv(on.t(), protected.to(embedding.dtype)).clamp_max_(1.0)


def nullification_factor(
    out_owned: torch.Tensor, in_owned: torch.Tensor | None, weight_ndim: int, groups: int = 1
) -> torch.Tensor:
    """Eq. 2 for a weight of shape ``(out, in / groups, *kernel)``: ``1 - min(a_i^{<t}, a_j^{<t})``.

    Returned in a shape that broadcasts against the weight (kernel dimensions are 1), so the backward
    pass multiplies by it without building a full-size coefficient tensor. ``in_owned=None`` means the
    ownership of the inputs is unknown, and every input counts as owned: a safe (conservative) choice.
    """
    out_units = out_owned.numel()
    trailing = (1,) * (weight_ndim - 2)
    if in_owned is None:
        return (1.0 - out_owned).view(out_units, 1, *trailing)
    in_per_group = in_owned.numel() // groups
    rows = in_owned.view(groups, in_per_group)
    if groups > 1:
        rows = rows.repeat_interleave(out_units // groups, dim=0)
    keep = 1.0 - out_owned.unsqueeze(1) * rows
    return keep.view(out_units, in_per_group, *trailing)
