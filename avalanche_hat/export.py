"""``export_task``: one task's sub-network of a converted model as a plain, pruned PyTorch module."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .converter import (HATConvertedNetwork, TaskIndexedBatchNormAct2d, TaskIndexedBuffer, TaskIndexedCopies,
                      _COMMUTING_FUNCTIONS, _COMMUTING_METHODS, _COMMUTING_MODULES, _ZERO_FUNCTIONS, _ZERO_METHODS,
                      _ZERO_MODULES, _extra_commuting_modules, _extra_zero_modules, fold_plan)
from .modules.base import HATModule
from .modules.conv import HATConv1d, HATConv2d, HATConv3d
from .modules.linear import HATLinear
from .modules.norm import TaskIndexedLayerNorm, TaskIndexedLinear, TaskIndexedParameter, _TaskIndexedNorm

__all__ = ["export_task", "ExportReport"]


class _NormAct(nn.Module):
    """BatchNorm2d, dropout, activation: a task's copy of timm's BatchNormAct2d as plain modules."""

    def __init__(self, norm: nn.BatchNorm2d, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, x):
        return self.act(self.drop(self.norm(x)))


class ExportReport(dict):
    """``{layer: (units kept, units)}`` for each HAT layer of the exported task; ``pruned`` lists the
    layers whose dead units were removed (the others have them folded to exact zeros)."""

    pruned: list

    def __str__(self) -> str:
        kept = sum(k for k, _ in self.values())
        total = sum(u for _, u in self.values())
        return (f"task keeps {kept} of {total} units in {len(self)} HAT layers; "
                f"{len(self.pruned)} layers pruned, the others hold their dead units as exact zeros")


def _plain_norm(norm: _TaskIndexedNorm | TaskIndexedBatchNormAct2d, t: int) -> nn.Module:
    if isinstance(norm, TaskIndexedBatchNormAct2d):
        return _NormAct(copy.deepcopy(norm.norm.task_copy(t)), copy.deepcopy(norm.drop), copy.deepcopy(norm.act))
    return copy.deepcopy(norm.task_copy(t))


def _bn_of(m: nn.Module) -> nn.Module:
    return m.norm if isinstance(m, _NormAct) else m


@torch.no_grad()
def _fold_into_norm(norm: nn.Module, mask: torch.Tensor) -> None:
    """``gamma m`` and ``beta m``: what the task-indexed norm does with the pending mask."""
    bn = _bn_of(norm)
    if bn.weight is None:
        bn.weight = nn.Parameter(mask.clone())
    else:
        bn.weight.mul_(mask)
    if bn.bias is not None:
        bn.bias.mul_(mask)


def _set(root: nn.Module, name: str, value) -> None:
    parent, _, attr = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if attr in owner._modules:
        del owner._modules[attr]
    if isinstance(value, nn.Parameter):
        owner.register_parameter(attr, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(attr, value)
    else:
        owner.add_module(attr, value)


def _elementwise(node, root: nn.Module) -> bool:
    """An operation of one tensor that maps 0 to 0 unit by unit and keeps the shape."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        return len(node.args) == 1 and not node.kwargs and isinstance(
            m, _COMMUTING_MODULES + _ZERO_MODULES + _extra_commuting_modules() + _extra_zero_modules())
    if node.op == "call_function":
        return node.target in _COMMUTING_FUNCTIONS + _ZERO_FUNCTIONS
    if node.op == "call_method":
        return node.target in _COMMUTING_METHODS | _ZERO_METHODS and len(node.args) == 1
    return False


@torch.no_grad()
def _prune(gm, layer_node, norm_node, keep: torch.Tensor) -> bool:
    """Remove the units of ``layer_node`` outside ``keep`` (and the matching inputs of the layers that
    read them), when every path from it leads through its norm and elementwise operations that map 0
    to 0 into plain convolutions (not grouped) or linear layers. Returns whether it pruned."""
    import torch.fx as fx

    layer = gm.get_submodule(layer_node.target)
    if getattr(layer, "groups", 1) != 1:
        return False  # a grouped convolution's rows belong to its groups
    value = layer_node
    if norm_node is not None:
        if len(layer_node.users) != 1:
            return False
        # the chain from the layer to its norm is elementwise by construction (fold_plan)
        norm = gm.get_submodule(norm_node.target)
        if not isinstance(_bn_of(norm), nn.modules.batchnorm._BatchNorm):
            return False  # a LayerNorm's statistics run over the units: removing zeros changes them
        value = norm_node
    chain = []
    while len(value.users) == 1 and _elementwise(next(iter(value.users)), gm):
        value = next(iter(value.users))
        chain.append(value)
    readers = list(value.users)
    if not readers:
        return False
    for r in readers:
        if r.op != "call_module" or len(r.args) != 1 or r.args[0] is not value or r.kwargs:
            return False
        m = gm.get_submodule(r.target)
        if isinstance(layer, nn.modules.conv._ConvNd):
            if type(m) is not type(layer) or m.groups != 1 or m.in_channels != layer.out_channels:
                return False
        elif type(m) is not nn.Linear or m.in_features != layer.out_features:
            return False
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == r.target) != 1:
            return False  # a layer called twice reads other inputs too
    if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == layer_node.target) != 1:
        return False
    idx = keep.nonzero().flatten()
    n = idx.numel()
    # the layer's rows
    layer.weight = nn.Parameter(layer.weight[idx].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias[idx].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = n
    else:
        layer.out_channels = n
    if norm_node is not None:
        bn = _bn_of(gm.get_submodule(norm_node.target))
        for name in ("weight", "bias"):
            p = getattr(bn, name)
            if p is not None:
                setattr(bn, name, nn.Parameter(p[idx].clone()))
        for name in ("running_mean", "running_var"):
            b = getattr(bn, name)
            if b is not None:
                setattr(bn, name, b[idx].clone())
        bn.num_features = n
    for r in readers:
        m = gm.get_submodule(r.target)
        m.weight = nn.Parameter(m.weight[:, idx].clone())
        if isinstance(m, nn.Linear):
            m.in_features = n
        else:
            m.in_channels = n
    return True


@torch.no_grad()
def export_task(model: HATConvertedNetwork, task_id: int, *, prune: bool = True) -> nn.Module:
    """Task ``task_id``'s network as a plain PyTorch module (a ``torch.fx.GraphModule``).

    Each HAT layer becomes its plain layer holding only the units the task's binary mask keeps
    (their weights, the matching norm channels and the inputs of the next layers); where a unit
    cannot be removed (a residual add or a concatenation joins it to other layers' units, a norm
    computes its statistics over the units, a grouped convolution reads it), the task's mask is
    folded into the layer's weights (or its norm's affine parameters), so dead units are exact zeros
    as in the HAT network. Task-indexed norms, per-task tensors and copies become the task's own; the
    head is the task's head. No mask, no payload: ``export_task(net, t)(x)`` equals
    ``net(x, task_id=t)`` in evaluation mode up to float rounding, and works with ``torch.export``.
    The returned module is in evaluation mode; ``.hat_export`` says what was kept and pruned.
    """
    import torch.fx as fx

    if not isinstance(model, HATConvertedNetwork):
        raise TypeError(
            f"export_task takes a network made by avalanche_hat.convert, got {type(model).__name__}"
        )
    model.hat_config.check_task_id(task_id)
    if task_id is None:
        raise ValueError("export_task needs a task id (the plain network is the model you converted)")
    kinds = model._kinds
    src = model.model
    tree = copy.deepcopy(src)
    graph = copy.deepcopy(model._graphs["plain"])
    masks = {}
    for name, kind in kinds.items():
        m = src.get_submodule(name)
        if kind == "hat":
            masks[name] = m.binary_mask(task_id)
            _set(tree, name, m.to_base_module())
        elif kind == "norm":
            _set(tree, name, _plain_norm(m, task_id))
        elif kind == "head":
            _set(tree, name, copy.deepcopy(m.task_copy(task_id)))
        elif kind == "copies":
            _set(tree, name, copy.deepcopy(m.task_copy(task_id)))
        elif kind == "param":
            value = m(task_id)
            _set(tree, name, nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad))
        elif kind == "buffer":
            _set(tree, name, m(task_id).clone())
    gm = fx.GraphModule(tree, graph, class_name=f"{type(src).__name__}Task{task_id}")
    folds = fold_plan(gm.graph, src, kinds)
    folded_into = {hat.target: norm for norm, hat in folds.items()}
    layer_nodes = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and kinds.get(node.target) == "hat":
            layer_nodes.setdefault(node.target, []).append(node)
    report = ExportReport()
    report.pruned = []
    for name, mask in masks.items():
        layer = gm.get_submodule(name)
        keep = mask > 0
        report[name] = (int(keep.sum()), keep.numel())
        norm_node = folded_into.get(name)
        if norm_node is not None:
            _fold_into_norm(gm.get_submodule(norm_node.target), mask.to(layer.weight.dtype))
        else:
            shape = (-1,) + (1,) * (layer.weight.ndim - 1)
            layer.weight.mul_(mask.to(layer.weight.dtype).view(shape))
            if layer.bias is not None:
                layer.bias.mul_(mask.to(layer.bias.dtype))
        nodes = layer_nodes.get(name, [])
        if prune and len(nodes) == 1 and 0 < int(keep.sum()) < keep.numel():
            if _prune(gm, nodes[0], norm_node, keep):
                report.pruned.append(name)
    gm.recompile()
    gm.eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    gm.hat_export = report
    return gm
