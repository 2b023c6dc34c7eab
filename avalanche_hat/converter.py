"""``convert``: any PyTorch / timm / torchvision model as a HAT network, from its traced graph.

The model is traced with ``torch.fx`` (twice: in training and in evaluation mode, since traced code
fixes every ``if self.training`` branch), its weighted layers are replaced by HAT layers, its norms
by task-indexed norms, its classifier by one head per task and every other trainable tensor by a
per-task copy. The graph is then rewritten so that the values that come out of a HAT layer travel
as :class:`HATPayload` objects, with the rules of the hand-written networks:

* a HAT layer leaves its mask pending; a task-indexed BatchNorm right after a convolution folds it
  into its affine parameters (masked units come out exactly 0, not ``beta``); a LayerNorm, whose
  statistics run over the units, sees the masked data;
* ReLU, dropout, drop-path and pooling over other axes run before the multiply (they commute with
  a non-negative per-unit mask); other activations with ``f(0) = 0`` keep the units' ownership;
* ``flatten``/``reshape``/``view``/``permute``/``transpose`` move the unit axis along with the data
  (or apply the mask first when the unit axis does not survive);
* a residual add applies each operand's mask exactly once; a concatenation applies the masks;
* before any other operation, in particular anything that mixes units (attention, a matrix
  product, a norm over another axis, indexing), the pending mask is applied. So a masked unit is
  an exact 0 wherever it could reach another unit.

``task_id=None`` runs the original network: HAT layers without masks and the copy of every
per-task part that holds the original values.
"""
from __future__ import annotations

import copy
import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import HATConfig
from .modules.base import HATModule, TaskIndexedModule
from .modules.conv import HATConv1d, HATConv2d, HATConv3d
from .modules.linear import HATLinear
from .modules.norm import (TaskIndexedBatchNorm1d, TaskIndexedBatchNorm2d, TaskIndexedBatchNorm3d,
                           TaskIndexedLayerNorm, TaskIndexedLinear, TaskIndexedParameter, _TaskIndexedNorm)
from .payload import HATPayload

__all__ = ["convert", "ConversionReport", "ConversionError", "HATConvertedNetwork", "TaskIndexedCopies"]


class ConversionError(RuntimeError):
    """The model cannot be converted (a part torch.fx cannot trace, an unsupported classifier, ...)."""


# ------------------------------------------------------------------------------------- report
@dataclass
class ConversionReport:
    """What :func:`convert` did to each part of the model (``print(report)`` shows a table)."""

    model: str
    rows: list = field(default_factory=list)  # (name, original type, what it became)
    notes: list = field(default_factory=list)

    def add(self, name: str, original: str, action: str) -> None:
        self.rows.append((name, original, action))

    def count(self, action_prefix: str) -> int:
        return sum(1 for _, _, a in self.rows if a.startswith(action_prefix))

    @property
    def hat_layers(self) -> list[str]:
        return [n for n, _, a in self.rows if a.startswith("HAT layer")]

    @property
    def heads(self) -> list[str]:
        return [n for n, _, a in self.rows if a.startswith("per-task head")]

    @property
    def per_task(self) -> list[str]:
        return [n for n, _, a in self.rows if a.startswith(("per-task", "task-indexed")) and not a.startswith("per-task head")]

    def summary(self) -> str:
        kinds = {}
        for _, _, a in self.rows:
            key = a.split(" (")[0].split(":")[0]
            kinds[key] = kinds.get(key, 0) + 1
        return ", ".join(f"{v} {k}" for k, v in kinds.items())

    def __str__(self) -> str:
        width = max([len(n) for n, _, _ in self.rows] + [4])
        owidth = max([len(o) for _, o, _ in self.rows] + [8])
        lines = [f"HAT conversion of {self.model}: {self.summary()}",
                 f"{'part'.ljust(width)}  {'original'.ljust(owidth)}  becomes"]
        lines += [f"{n.ljust(width)}  {o.ljust(owidth)}  {a}" for n, o, a in self.rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = ["| part | original | becomes |", "|---|---|---|"]
        lines += [f"| `{n}` | {o} | {a} |" for n, o, a in self.rows]
        return "\n".join(lines)


# ------------------------------------------------------------------------- per-task modules
class TaskIndexedCopies(TaskIndexedModule):
    """Any module as one independent copy per task (and the original for ``task_id=None``): the
    converter's fallback for a layer with parameters it has no HAT counterpart for (GroupNorm,
    PReLU, a custom norm, ...). ``module(*args, task_id=t)`` runs task ``t``'s copy on tensors."""

    def __init__(self, module: nn.Module, hat_config: HATConfig):
        super().__init__()
        self.hat_config = hat_config
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(hat_config.num_tasks))
        self.copies.append(module)

    def forward(self, *args, task_id: int | None = None, **kwargs):
        return self.copy_for(task_id)(*args, **kwargs)


class TaskIndexedBatchNormAct2d(TaskIndexedModule):
    """timm's ``BatchNormAct2d`` (BatchNorm2d, dropout, activation in one module) with a
    task-indexed norm that folds the pending mask, then its dropout and activation."""

    def __init__(self, module: nn.Module, hat_config: HATConfig):
        super().__init__()
        self.hat_config = hat_config
        plain = nn.BatchNorm2d(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                               track_running_stats=module.track_running_stats,
                               device=module.weight.device if module.weight is not None else None,
                               dtype=module.weight.dtype if module.weight is not None else None)
        plain.load_state_dict({k: v for k, v in module.state_dict().items() if "." not in k})
        self.norm = TaskIndexedBatchNorm2d.from_base_module(plain, hat_config)
        self.copies = self.norm.copies
        self.drop, self.act = module.drop, module.act

    def forward(self, payload: HATPayload) -> HATPayload:
        p = self.norm(payload)
        return _module_unitwise(_module_unitwise(p, self.drop), self.act)

    def expand_plain_state(self, plain: dict) -> dict:
        return {f"norm.{k}": v for k, v in self.norm.expand_plain_state(plain).items()}


class TaskIndexedBuffer(nn.Module):
    """A floating-point buffer the traced forward reads, one copy per task (and the original)."""

    def __init__(self, value: torch.Tensor, hat_config: HATConfig):
        super().__init__()
        self.hat_config = hat_config
        for i in range(hat_config.num_tasks + 1):
            self.register_buffer(f"copy_{i}", value.detach().clone())

    def forward(self, task_id: int | None) -> torch.Tensor:
        self.hat_config.check_task_id(task_id)
        return getattr(self, f"copy_{self.hat_config.num_tasks if task_id is None else task_id}")


# -------------------------------------------------------------------- what commutes with a mask
_TIMM_TYPES: dict = {}


def _timm_types(*names: str) -> tuple:
    """timm's classes of these names, if timm is loaded (a model without timm has none of them).
    Looked up once per process after timm is loaded (this runs in every forward)."""
    found = _TIMM_TYPES.get(names)
    if found is not None:
        return found
    import sys

    tl = sys.modules.get("timm.layers")
    if tl is None:
        return ()
    found = _TIMM_TYPES[names] = tuple(getattr(tl, n) for n in names if hasattr(tl, n))
    return found


# Elementwise, and f(m x) = m f(x) for m >= 0: the mask stays pending through them.
_COMMUTING_MODULES = (nn.ReLU, nn.Identity, nn.LeakyReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                      nn.AlphaDropout)
# Elementwise with f(0) = 0: the mask is applied first, the ownership of the units carries over.
_ZERO_MODULES = (nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.Mish, nn.ELU, nn.ReLU6, nn.Hardtanh, nn.Softsign,
                 nn.Tanhshrink, nn.CELU, nn.SELU, nn.Softshrink, nn.Hardshrink)
# Pooling over the last ``k`` axes (commutes with a per-unit mask on an axis before those).
_POOLS = {nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveMaxPool1d: 1, nn.AdaptiveAvgPool1d: 1,
          nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveAvgPool2d: 2,
          nn.MaxPool3d: 3, nn.AvgPool3d: 3, nn.AdaptiveMaxPool3d: 3, nn.AdaptiveAvgPool3d: 3}

# (tuples: their order names the wrappers below, the same in every process)
_COMMUTING_FUNCTIONS = (F.relu, torch.relu, F.relu_, torch.relu_, F.leaky_relu, F.dropout, F.dropout1d, F.dropout2d,
                        F.dropout3d)
_ZERO_FUNCTIONS = (F.gelu, F.silu, F.hardswish, F.mish, F.elu, F.relu6, F.hardtanh, torch.tanh, F.tanh, F.selu,
                   F.celu, F.softsign)
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2, F.avg_pool2d: 2, F.max_pool2d: 2,
                   F.adaptive_avg_pool1d: 1, F.avg_pool1d: 1, F.max_pool1d: 1}
_COMMUTING_METHODS = {"relu", "relu_", "contiguous", "clone"}
_ZERO_METHODS = {"tanh", "tanh_"}
_META_METHODS = {"size", "dim", "numel", "type_as_meta"}
_META_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda"}


def _extra_commuting_modules() -> tuple:
    return _timm_types("DropPath")


def _extra_zero_modules() -> tuple:
    return _timm_types("GELU", "GELUTanh", "Swish", "SwishMe", "Mish", "MishMe", "HardSwish", "HardSwishMe",
                       "HardMish", "HardMishMe", "Tanh")


# ------------------------------------------------------------------------ runtime helpers
# The rewritten graph calls these; each takes tensors or payloads and returns one of them.
def _wrap(x, task_id, mask_scale):
    """A payload for a HAT layer's input (a tensor gets the task id and scale, no mask)."""
    if isinstance(x, HATPayload):
        return x
    return HATPayload(x, task_id=task_id, mask_scale=mask_scale)


def _tensor(x):
    """The tensor with its pending mask applied (what every other operation sees)."""
    return x.data if isinstance(x, HATPayload) else x


def _raw(x):
    """The tensor before the mask (for shape, dtype and device queries only)."""
    return x.unmasked_data if isinstance(x, HATPayload) else x


def _keeps_units(p: HATPayload, out: torch.Tensor) -> bool:
    return out.ndim == p.ndim and out.shape[p.mask_dim] == p.shape[p.mask_dim]


def _unitwise(x, fn, args=(), kwargs=None, *, commute: bool = False, zero: bool = True, spatial: int = 0):
    """``fn(x, *args)`` for an operation that acts unit by unit (``spatial``: it pools over the last
    ``spatial`` axes, so it acts unit by unit only for a unit axis before them). ``commute``: it
    commutes with a non-negative per-unit mask, which then stays pending; ``zero``: ``f(0) = 0``,
    so the units' ownership carries over. Anything else: the mask is applied first."""
    kwargs = kwargs or {}
    if not isinstance(x, HATPayload):
        return fn(x, *args, **kwargs)
    on_units = x.mask_dim is not None and x.mask_dim < x.ndim - spatial
    if commute and on_units and x.pending_mask is not None:
        out = fn(x.unmasked_data, *args, **kwargs)
        if _keeps_units(x, out):
            return x.derive(out, mask=x.pending_mask, mask_dim=x.mask_dim, ownership=x.ownership)
        raise ConversionError(f"{getattr(fn, '__name__', fn)} changed the unit axis of its input")  # pragma: no cover
    out = fn(x.data, *args, **kwargs)
    if zero and on_units and x.ownership is not None and _keeps_units(x, out):
        return x.derive(out, mask_dim=x.mask_dim, ownership=x.ownership)
    return out


def _module_unitwise(x, module: nn.Module):
    """A parameterless module applied to a payload with the rules of :func:`_unitwise`."""
    if isinstance(module, _COMMUTING_MODULES + _extra_commuting_modules()):
        return _unitwise(x, module, commute=True)
    if type(module) in _POOLS:
        return _unitwise(x, module, commute=True, spatial=_POOLS[type(module)])
    if isinstance(module, _ZERO_MODULES + _extra_zero_modules()):
        return _unitwise(x, module, zero=True)
    return module(_tensor(x))


def _add(a, b):
    """``a + b``: each operand's mask applied once; ownership kept where both operands have it."""
    if isinstance(a, HATPayload):
        return a + b
    if isinstance(b, HATPayload):
        return b + a  # IEEE addition is commutative: the same bits as a + b
    return a + b


def _mul(a, b):
    """``a * b``: a scalar multiple keeps the mask pending; anything else sees the masked data."""
    if isinstance(a, HATPayload) and isinstance(b, (int, float)):
        return a * b
    if isinstance(b, HATPayload) and isinstance(a, (int, float)):
        return b * a
    return _tensor(a) * _tensor(b)


def _cat(tensors, dim=0):
    """Concatenation: the masks are applied; ownership survives along the other axes."""
    if not any(isinstance(t, HATPayload) for t in tensors):
        return torch.cat(tensors, dim)
    first = next(t for t in tensors if isinstance(t, HATPayload))
    parts = [t if isinstance(t, HATPayload) else first.derive(t) for t in tensors]
    return HATPayload.cat(parts, dim=dim)


def _shape_method(x, name, *args):
    """``flatten``/``reshape``/``view``/``permute``/``transpose`` of a payload: the unit axis moves with it."""
    if not isinstance(x, HATPayload):
        return getattr(x, name)(*args)
    if name == "flatten":
        return x.flatten(*args)
    if name in ("reshape", "view"):
        return x.reshape(*args)
    if name == "permute":
        return x.permute(*args)
    return x.transpose(*args)


def _reduce(x, name, dims=None, keepdim=False):
    """``x.mean(dims)`` / ``x.sum(dims)`` over axes other than the unit axis keep the mask pending."""
    if not isinstance(x, HATPayload) or dims is None or x.mask_dim is None:
        return getattr(_tensor(x), name)(*(() if dims is None else (dims,)), keepdim=keepdim)
    nd = x.ndim
    reduced = sorted({d % nd for d in ((dims,) if isinstance(dims, int) else dims)})
    if x.mask_dim in reduced:
        return getattr(x.data, name)(dims, keepdim=keepdim)
    out = getattr(x.unmasked_data, name)(dims, keepdim=keepdim)
    new_dim = x.mask_dim if keepdim else x.mask_dim - sum(1 for d in reduced if d < x.mask_dim)
    if x.pending_mask is None and x.ownership is None:
        return out
    return x.derive(out, mask=x.pending_mask, mask_dim=new_dim, ownership=x.ownership)


def _head(module, x, task_id):
    """A per-task classifier on the masked features."""
    return module(_tensor(x), task_id)


for _fn in (_wrap, _tensor, _raw, _unitwise, _module_unitwise, _add, _mul, _cat, _shape_method, _reduce, _head):
    _fn.__module__ = __name__


# -------------------------------------------------------------------------------- tracing
_HAT_TYPES = {nn.Linear: HATLinear, nn.Conv1d: HATConv1d, nn.Conv2d: HATConv2d, nn.Conv3d: HATConv3d}
_NORM_TYPES = {nn.BatchNorm1d: TaskIndexedBatchNorm1d, nn.BatchNorm2d: TaskIndexedBatchNorm2d,
               nn.BatchNorm3d: TaskIndexedBatchNorm3d, nn.LayerNorm: TaskIndexedLayerNorm}


def _hat_counterpart(module: nn.Module):
    """The HAT class for a weighted layer whose forward is the plain one (or timm's equivalent)."""
    for base, cls in _HAT_TYPES.items():
        if type(module) is base:
            return cls
    if isinstance(module, nn.Linear) and type(module).__name__ == "Linear" and type(module).__module__.startswith("timm"):
        return HATLinear  # timm.layers.Linear: nn.Linear with a dtype cast for scripting
    return None


def _norm_counterpart(module: nn.Module):
    for base, cls in _NORM_TYPES.items():
        if type(module) is base:
            return cls
    if type(module).__name__ == "LayerNorm" and type(module).__module__.startswith("timm"):
        return TaskIndexedLayerNorm  # timm.layers.LayerNorm: nn.LayerNorm (or its fused kernel)
    if type(module).__name__ == "BatchNormAct2d" and type(module).__module__.startswith("timm"):
        return TaskIndexedBatchNormAct2d
    return None


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer (kept whole: traced code would fix its ``if self.training`` branches)."""
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)):
        return True
    name = type(module).__name__
    weighted = any(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in module.modules())
    return "Norm" in name and not name.startswith("Conv") and not weighted


def _timm_notrace() -> tuple[list, list]:
    import sys

    if "timm" not in sys.modules:
        return [], []
    from timm.layers import get_notrace_functions, get_notrace_modules

    return list(get_notrace_modules()), list(get_notrace_functions())


def _make_tracer(extra_leaves: tuple):
    import torch.fx as fx

    leaf_classes, functions = _timm_notrace()

    class Tracer(fx.Tracer):
        def __init__(self):
            super().__init__(autowrap_functions=tuple(f for f in functions if callable(f)), param_shapes_constant=True)
            self.where: list[str] = []
            self.failed_at: str | None = None

        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if _hat_counterpart(m) or _norm_counterpart(m) or _is_norm(m):
                return True
            if type(m) in leaf_classes or isinstance(m, extra_leaves):
                return True
            if isinstance(m, tuple(_POOLS) + _extra_commuting_modules() + _extra_zero_modules()):
                return True
            return super().is_leaf_module(m, qualname)

        def call_module(self, m, forward, args, kwargs):
            self.where.append(self.path_of_module(m))
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed_at is None:
                    self.failed_at = self.where[-1]
                raise
            finally:
                self.where.pop()

    return Tracer


def _trace(model: nn.Module, training: bool, extra_leaves: tuple):
    Tracer = _make_tracer(extra_leaves)
    tracer = Tracer()
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())
    concrete = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}
    required = [p.name for p in params[1:] if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if required:
        raise ConversionError(
            f"{type(model).__name__}.forward takes more than one required input ({', '.join(required)}): convert "
            "handles models called as model(x); wrap yours in a module whose forward takes one tensor"
        )
    was = model.training
    model.train(training)
    try:
        return tracer.trace(model, concrete_args=concrete or None)
    except Exception as err:
        where = tracer.failed_at
        part = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else "its top-level forward"
        raise ConversionError(
            f"cannot trace {type(model).__name__} with torch.fx in {part}: {type(err).__name__}: {err}\n"
            "torch.fx follows the forward pass symbolically, so Python control flow on tensor values or shapes, "
            "and calls it cannot see through, stop it. Pass that module (or its class) in "
            "convert(..., leaf_modules=(...)): it is then kept whole, as one copy per task without HAT masks "
            "inside it."
        ) from err
    finally:
        model.train(was)


# ------------------------------------------------------------------------------- the network
class HATConvertedNetwork(nn.Module):
    """A model converted by :func:`convert`: ``net(x, task_id=t, mask_scale=s)`` returns a tensor.

    ``x`` is a tensor (with ``task_id`` and ``mask_scale``) or a :class:`HATPayload`.
    ``task_id=None`` is the original network. ``.model`` holds the converted modules (the original
    hierarchy and names), ``.hat_report`` what the conversion did, ``.num_classes`` the classes of
    each task's head (0 when the model returns features).
    """

    def __init__(self, model: nn.Module, graphs: dict, hat_config: HATConfig, report: ConversionReport,
                 heads: list[str], num_classes: int, num_features: int | None, kinds: dict):
        super().__init__()
        self.model = model
        self.hat_config = hat_config
        self.hat_report = report
        self.head_names = list(heads)
        self.num_classes = int(num_classes)
        if num_features is not None:
            self.num_features = int(num_features)
        self._graphs = graphs
        self._kinds = kinds
        self._compile()

    def _compile(self) -> None:
        self._code = {}
        for mode, graph in self._graphs.items():
            if mode == "plain":
                continue
            code = graph.python_code(root_module="self")
            scope = dict(code.globals)
            exec(compile(code.src, f"<avalanche_hat.convert {mode}>", "exec"), scope)
            self._code[mode] = scope["forward"]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_code", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._compile()

    def graph(self, training: bool | None = None):
        """The rewritten ``torch.fx`` graph run in training (or evaluation) mode."""
        return self._graphs["train" if (self.training if training is None else training) else "eval"]

    def forward(self, x, task_id: int | None = None, mask_scale: float | None = None) -> torch.Tensor:
        if isinstance(x, HATPayload):
            if (task_id is not None and task_id != x.task_id) or (
                mask_scale is not None and float(mask_scale) != x.mask_scale
            ):
                raise ValueError(
                    f"the input payload is for task {x.task_id} (mask_scale {x.mask_scale}) but task_id={task_id}, "
                    f"mask_scale={mask_scale} were passed as well: pass one or the other"
                )
            task_id, mask_scale, x = x.task_id, x.mask_scale, x.data
        self.hat_config.check_task_id(task_id)
        if mask_scale is not None:
            if task_id is None:
                raise ValueError("a mask_scale needs a task_id: net(x, task_id=t, mask_scale=s)")
            mask_scale = float(mask_scale)
        return self._code["train" if self.training else "eval"](self.model, x, task_id, mask_scale)

    def get_classifier(self):
        heads = [self.model.get_submodule(n) for n in self.head_names]
        return heads[0] if len(heads) == 1 else tuple(heads) if heads else nn.Identity()


# ---------------------------------------------------------------------------- conversion
def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if attr in owner._parameters:
        del owner._parameters[attr]
    if attr in owner._buffers:
        del owner._buffers[attr]
    setattr(owner, attr, module)


def has_no_classifier(model: nn.Module) -> bool:
    """True when the model says it returns features: timm's ``get_classifier()`` is an ``nn.Identity``
    (``num_classes=0``) or holds no ``nn.Linear``. Then no other linear layer is taken for its head."""
    get = getattr(model, "get_classifier", None)
    if not callable(get):
        return False
    try:
        cls = get()
    except Exception:  # pragma: no cover - a model's own method failing
        return False
    parts = [m for m in (cls if isinstance(cls, (tuple, list)) else (cls,)) if isinstance(m, nn.Module)]
    return bool(parts) and not any(isinstance(s, nn.Linear) for m in parts for s in m.modules())


def _find_heads(model: nn.Module, heads, linear_calls: list[str]) -> dict[str, int | None]:
    """``{qualified name: classes per task (None: the model's own)}`` for the classifier(s)."""
    names = {id(m): n for n, m in model.named_modules()}
    num_classes = None
    if isinstance(heads, bool):
        raise TypeError("heads must be a module name, a number of classes per task, a dict or a list, not a bool")
    if isinstance(heads, int):
        num_classes, heads = heads, None
    if heads is None:
        found = []
        get = getattr(model, "get_classifier", None)
        if callable(get):
            try:
                cls = get()
            except Exception:  # pragma: no cover - a model's own method failing
                cls = None
            for m in (cls if isinstance(cls, (tuple, list)) else (cls,)):
                if isinstance(m, nn.Linear) and id(m) in names:
                    found.append(names[id(m)])
                elif isinstance(m, nn.Module) and not isinstance(m, nn.Identity):
                    lin = [names[id(s)] for s in m.modules() if isinstance(s, nn.Linear)]
                    found += lin[-1:]
        if not found and linear_calls and not has_no_classifier(model):
            found = [linear_calls[-1]]  # the last linear layer the forward calls
        if not found and num_classes and has_no_classifier(model):
            raise ConversionError(
                f"{type(model).__name__} returns features (its classifier is {type(model.get_classifier()).__name__}, "
                f"timm's num_classes=0), so there is no classifier to replace by {num_classes}-class per-task heads: "
                "convert with heads=() and add the heads on the features (HATMultiTaskModel(net, num_classes=...), "
                "or HAT(model=..., hat_config=..., num_classes=...) does both), or create the model with "
                "num_classes > 0"
            )
        if not found and num_classes:
            raise ConversionError(
                f"{type(model).__name__} has no linear classifier to replace by {num_classes}-class per-task heads "
                "(per-task heads replace an nn.Linear): make the model end in an nn.Linear classifier (for a "
                "convolutional classifier: global pooling, flatten and nn.Linear), or name the nn.Linear that is "
                "the classifier with heads='<module name>'"
            )
        return {n: num_classes for n in found}
    if isinstance(heads, str):
        heads = {heads: num_classes}
    elif isinstance(heads, (list, tuple)):
        heads = {h: num_classes for h in heads}
    if not isinstance(heads, dict):
        raise TypeError(f"heads must be a module name, an int, a dict or a list, got {type(heads).__name__}")
    for name in heads:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ConversionError(f"heads names {name!r}, which is not a module of {type(model).__name__}") from None
        if not isinstance(m, nn.Linear):
            raise ConversionError(
                f"the classifier {name!r} is a {type(m).__name__}: per-task heads replace nn.Linear layers. Replace "
                f"it in the model by an nn.Linear classifier (after global pooling and flatten for a convolutional "
                f"one), or pass heads=() to keep it as a HAT layer that all tasks share (once earlier tasks own its "
                f"units, later tasks cannot change them)"
            )
    return dict(heads)


def convert(model: nn.Module, hat_config: HATConfig, *, heads=None, leaf_modules: Iterable = ()) -> HATConvertedNetwork:
    """A HAT network made from an unmodified PyTorch, timm or torchvision model.

    Args:
        model: the model (left unchanged: the network is built from a copy; its weights, pretrained
            or not, are every task's starting point).
        hat_config: the HAT settings (number of tasks, ...).
        heads: which module is the classifier and how many classes each task's head has. ``None``
            (default): the model's timm ``get_classifier()`` or else the last linear layer its forward
            calls, with its own number of classes; an ``int``: that many classes per task; a module
            name, a list of names, or ``{name: classes}`` (``None`` keeps the width); ``()``: no head.
            Each becomes a :class:`TaskIndexedLinear` (one head per task; the ``task_id=None`` copy
            is the original classifier).
        leaf_modules: module classes (or instances) to keep whole instead of tracing into them
            (for a part torch.fx cannot trace); each becomes one copy per task, without HAT masks.

    Returns:
        a :class:`HATConvertedNetwork` called as ``net(x, task_id=t, mask_scale=s)``; its
        ``hat_report`` (a :class:`ConversionReport`) lists what became what.

    Weighted layers (``nn.Linear``, ``nn.Conv1d/2d/3d``, grouped and depthwise, the q/k/v, projection
    and MLP layers of attention blocks) become HAT layers; BatchNorm and LayerNorm become task-indexed
    norms that fold the pending mask; any other layer with parameters becomes one copy per task
    (:class:`TaskIndexedCopies`), and every other trainable tensor the forward reads (class tokens,
    position embeddings, LayerScale, learned scalars) one :class:`TaskIndexedParameter` per task.
    """
    import torch.fx as fx

    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    if not isinstance(hat_config, HATConfig):
        raise TypeError(f"convert needs a HATConfig, e.g. HATConfig(num_tasks=5); got {type(hat_config).__name__}")
    if any(isinstance(m, (HATModule, TaskIndexedModule)) for m in model.modules()):
        raise ConversionError(
            f"{type(model).__name__} already has HAT or task-indexed layers: convert takes a plain model "
            "(a HAT network needs no conversion)"
        )
    leaf_types = tuple(m if isinstance(m, type) else type(m) for m in leaf_modules)
    model = copy.deepcopy(model)
    graphs = {"train": _trace(model, True, leaf_types), "eval": _trace(model, False, leaf_types)}
    report = ConversionReport(type(model).__name__)

    called = []  # call_module targets in graph order (both graphs)
    attrs = []
    for graph in graphs.values():
        for node in graph.nodes:
            if node.op == "call_module" and node.target not in called:
                called.append(node.target)
            if node.op == "get_attr" and node.target not in attrs:
                attrs.append(node.target)
    linear_calls = [n for n in called if isinstance(model.get_submodule(n), nn.Linear)]
    head_spec = _find_heads(model, heads, linear_calls)
    features_width = getattr(model, "num_features", None) if has_no_classifier(model) else None

    # Replace the modules (by qualified name; the graphs refer to them by name).
    kinds: dict[str, str] = {}
    num_classes, num_features = 0, None
    for name in called:
        m = model.get_submodule(name)
        tname = type(m).__name__
        if name in head_spec:
            width = head_spec[name] if head_spec[name] is not None else m.out_features
            new = TaskIndexedLinear(m.in_features, width, hat_config, bias=m.bias is not None,
                                    device=m.weight.device, dtype=m.weight.dtype)
            with torch.no_grad():
                for c in new.copies[:-1]:
                    if width == m.out_features:
                        c.load_state_dict(m.state_dict())
            new.copies[-1] = m  # task_id=None: the original classifier
            _set_submodule(model, name, new)
            kinds[name] = "head"
            num_classes = num_classes or width
            num_features = num_features or m.in_features
            kept = "starts from the original" if width == m.out_features else "freshly initialised"
            report.add(name, tname, f"per-task head: TaskIndexedLinear({m.in_features}, {width}), {kept}")
            continue
        hat_cls = _hat_counterpart(m)
        if hat_cls is not None:
            plain = m
            if type(m) is not nn.Linear and hat_cls is HATLinear:
                plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                  device=m.weight.device, dtype=m.weight.dtype)
                plain.load_state_dict(m.state_dict())
            new = hat_cls.from_base_module(plain, hat_config)
            _set_submodule(model, name, new)
            kinds[name] = "hat"
            extra = f", groups={m.groups}" if getattr(m, "groups", 1) > 1 else ""
            report.add(name, tname, f"HAT layer: {type(new).__name__} ({new.num_units} units{extra})")
            continue
        norm_cls = _norm_counterpart(m)
        if norm_cls is not None:
            if norm_cls is TaskIndexedBatchNormAct2d:
                new = TaskIndexedBatchNormAct2d(m, hat_config)
            else:
                if type(m) is not nn.LayerNorm and norm_cls is TaskIndexedLayerNorm:
                    plain = nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                                         bias=m.bias is not None)
                    plain.load_state_dict(m.state_dict())
                    plain.to(m.weight.device if m.weight is not None else "cpu")
                    m = plain
                new = norm_cls.from_base_module(m, hat_config)
            _set_submodule(model, name, new)
            kinds[name] = "norm"
            report.add(name, tname, f"task-indexed norm: {type(new).__name__} (one copy per task)")
            continue
        has_params = any(True for _ in m.parameters())
        float_buffers = any(b.is_floating_point() for b in m.buffers())
        if has_params or float_buffers:
            new = TaskIndexedCopies(m, hat_config)
            _set_submodule(model, name, new)
            kinds[name] = "copies"
            report.add(name, tname, "per-task copies: TaskIndexedCopies (no HAT mask inside; masks applied before it)")
        else:
            kinds[name] = "plain"
    # Tensors the forward reads directly.
    for name in attrs:
        try:
            value = model.get_parameter(name)
            is_param = True
        except AttributeError:
            try:
                value = model.get_buffer(name)
            except AttributeError:
                continue
            is_param = False
        if is_param:
            tip = TaskIndexedParameter(tuple(value.shape), hat_config, device=value.device, dtype=value.dtype)
            with torch.no_grad():
                for p in tip.copies:
                    p.copy_(value)
            tip.copies[-1].requires_grad_(value.requires_grad)
            if not value.requires_grad:
                for p in tip.copies:
                    p.requires_grad_(False)
            _set_submodule(model, name, tip)
            kinds[name] = "param"
            report.add(name, f"Parameter{tuple(value.shape)}", "per-task tensor: TaskIndexedParameter")
        elif value.is_floating_point():
            _set_submodule(model, name, TaskIndexedBuffer(value, hat_config))
            kinds[name] = "buffer"
            report.add(name, f"buffer{tuple(value.shape)}", "per-task buffer: TaskIndexedBuffer")
    # Parameters no part of the forward reads: frozen (they cannot affect any output).
    for pname, p in model.named_parameters():
        owner = pname.rpartition(".")[0]
        used = any(pname == k or pname.startswith(k + ".") for k in kinds)
        if not used and p.requires_grad:
            p.requires_grad_(False)
            report.add(pname, f"Parameter{tuple(p.shape)}", "frozen (the forward never reads it)")
    if not head_spec:
        report.notes.append("no classifier: the network returns the model's output (features) for every task")
        if isinstance(features_width, int) and not isinstance(features_width, bool):
            num_features = features_width  # timm's width of the features it returns
    new_graphs = {mode: _rewrite(g, model, kinds) for mode, g in graphs.items()}
    new_graphs["plain"] = graphs["eval"]  # the traced original, for export_task
    new_graphs["plain"]._tracer_cls = None  # a class local to convert: the graph pickles without it
    if not any(k == "hat" for k in kinds.values()):
        heads_part = f" besides its classifier ({', '.join(head_spec)})" if head_spec else ""
        copies = [f"{n} ({type(model.get_submodule(n).copies[-1]).__name__})" for n, k in kinds.items()
                  if k == "copies"]
        kept = f"; these parts would only be copied per task, without masks: {', '.join(copies)}" if copies else ""
        raise ConversionError(
            f"{type(model).__name__} has no linear or convolutional layer{heads_part} to put a HAT mask on{kept}. "
            "HAT masks the units of nn.Linear and nn.Conv1d/2d/3d layers: give the model at least one such "
            "layer before its classifier (for a recurrent or embedding model, for example an nn.Linear on its "
            "features)"
        )
    return HATConvertedNetwork(model, new_graphs, hat_config, report, list(head_spec), num_classes, num_features, kinds)


# ------------------------------------------------------------------------------ the rewrite
_SHAPE_METHODS = {"flatten", "reshape", "view", "permute", "transpose"}


def _rewrite(graph, root: nn.Module, kinds: dict):
    """The graph with payload semantics: HAT layers take and return payloads, and a pending mask is
    applied before any operation not known to act unit by unit."""
    import torch.fx as fx

    new = fx.Graph()
    folds = fold_plan(graph, root, kinds)
    env: dict = {}
    payload: set = set()  # new nodes whose value may be a HATPayload
    materialised: dict = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    task = scale = None

    def tensor(n):
        if n in payload:
            if n not in materialised:
                materialised[n] = new.call_function(_tensor, (n,))
            return materialised[n]
        return n

    def lookup(a, convert=True):
        return fx.node.map_arg(a, lambda n: tensor(env[n]) if convert else env[n])

    for node in graph.nodes:
        op = node.op
        if op == "placeholder":
            env[node] = new.placeholder(node.name, default_value=node.args[0] if node.args else inspect.Parameter.empty)
            if node is placeholders[0]:
                task = new.placeholder("task_id")
                scale = new.placeholder("mask_scale")
            continue
        if op == "output":
            new.output(lookup(node.args[0]))
            continue
        if op == "get_attr":
            kind = kinds.get(node.target)
            if kind in ("param", "buffer"):
                env[node] = new.call_module(node.target, (task,))
            else:
                env[node] = new.get_attr(node.target)
            continue
        args_raw = fx.node.map_arg(node.args, lambda n: env[n])
        first = args_raw[0] if args_raw else None
        first_is_payload = isinstance(first, fx.Node) and first in payload
        if op == "call_module":
            kind = kinds.get(node.target)
            if kind in ("hat", "norm"):
                if node.kwargs or len(node.args) != 1:
                    raise ConversionError(f"{node.target} is called with extra arguments: {node.args[1:]} {node.kwargs}")
                x = args_raw[0]
                if kind == "norm" and node not in folds:
                    x = tensor(x)  # the mask is not on this norm's axis for sure: applied before it
                x = new.call_function(_wrap, (x, task, scale))
                out = new.call_module(node.target, (x,))
                payload.add(out)
            elif kind == "head":
                out = new.call_function(_head, (new.get_attr(node.target), args_raw[0], task))
            elif kind == "copies":
                out = new.call_module(node.target, lookup(node.args), {**lookup(node.kwargs), "task_id": task})
            elif first_is_payload and len(node.args) == 1 and not node.kwargs:
                out = new.call_function(_module_unitwise, (first, new.get_attr(node.target)))
                payload.add(out)
            else:
                out = new.call_module(node.target, lookup(node.args), lookup(node.kwargs))
            env[node] = out
            continue
        if op == "call_function":
            fn = node.target
            anyp = _has_payload(args_raw, payload)
            if not anyp:
                env[node] = new.call_function(fn, lookup(node.args), lookup(node.kwargs))
                continue
            out = None
            if fn in (operator.add, operator.iadd, torch.add) and len(node.args) == 2 and not node.kwargs:
                out = new.call_function(_add, args_raw)
            elif fn in (operator.mul, operator.imul, torch.mul) and len(node.args) == 2 and not node.kwargs:
                out = new.call_function(_mul, args_raw)
            elif fn is torch.cat and not node.kwargs or (fn is torch.cat and set(node.kwargs) <= {"dim"}):
                dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
                out = new.call_function(_cat, (list(args_raw[0]), dim))
            elif fn is torch.flatten and first_is_payload and not node.kwargs:
                out = new.call_function(_shape_method, (first, "flatten", *args_raw[1:]))
            elif fn in (torch.permute, torch.transpose, torch.reshape) and first_is_payload and not node.kwargs:
                name = {torch.permute: "permute", torch.transpose: "transpose", torch.reshape: "reshape"}[fn]
                out = new.call_function(_shape_method, (first, name, *args_raw[1:]))
            elif fn in _UNITWISE_CALLS and first_is_payload:
                out = new.call_function(_UNITWISE_CALLS[fn], (first, *lookup(node.args[1:])), lookup(node.kwargs))
            elif fn is getattr and first_is_payload and node.args[1] in _META_ATTRS:
                out = new.call_function(getattr, (new.call_function(_raw, (first,)), node.args[1]))
            if out is None:
                env[node] = new.call_function(fn, lookup(node.args), lookup(node.kwargs))
            else:
                if out.target is not getattr:
                    payload.add(out)
                env[node] = out
            continue
        if op == "call_method":
            name = node.target
            if not first_is_payload:
                env[node] = new.call_method(name, lookup(node.args), lookup(node.kwargs))
                continue
            rest = args_raw[1:]
            rest_has_payload = _has_payload(rest, payload) or _has_payload(tuple(node.kwargs.values()), payload)
            out = None
            if name in _META_METHODS and not rest_has_payload:
                env[node] = new.call_method(name, (new.call_function(_raw, (first,)), *rest), dict(node.kwargs))
                continue
            if name in _SHAPE_METHODS and not node.kwargs and not rest_has_payload:
                out = new.call_function(_shape_method, (first, name, *rest))
            elif name in ("mean", "sum") and not rest_has_payload and set(node.kwargs) <= {"dim", "keepdim"}:
                dims = node.kwargs.get("dim", rest[0] if rest else None)
                keep = node.kwargs.get("keepdim", rest[1] if len(rest) > 1 else False)
                out = new.call_function(_reduce, (first, name, dims, keep))
            elif name in _UNITWISE_METHODS and not rest and not node.kwargs:
                out = new.call_function(_UNITWISE_METHODS[name], (first,))
            if out is None:
                env[node] = new.call_method(name, lookup(node.args), lookup(node.kwargs))
            else:
                payload.add(out)
                env[node] = out
            continue
        raise ConversionError(f"unexpected graph node {node.op} {node.target}")  # pragma: no cover
    new.lint()

    return new


def _chain_op(node, root: nn.Module, kinds: dict) -> bool:
    """An elementwise operation with f(m x) = m f(x) for m >= 0 applied to one value (the mask of a
    HAT layer may be carried through it to a norm)."""
    if len(node.args) < 1 or node.kwargs and node.op != "call_function":
        return False
    if node.op == "call_module":
        return kinds.get(node.target, "plain") == "plain" and len(node.args) == 1 and isinstance(
            root.get_submodule(node.target), _COMMUTING_MODULES + _extra_commuting_modules())
    if node.op == "call_function":
        return node.target in _COMMUTING_FUNCTIONS
    if node.op == "call_method":
        return node.target in _COMMUTING_METHODS and len(node.args) == 1 or _permute_dims(node) is not None
    return False


def _permute_dims(node):
    """The constant axis order of a ``x.permute(...)`` node, or None."""
    if node.op != "call_method" or node.target != "permute" or node.kwargs:
        return None
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return tuple(dims) if dims and all(isinstance(d, int) and not isinstance(d, bool) for d in dims) else None


def _chain_source(node, root: nn.Module, kinds: dict):
    """The HAT layer node whose output reaches ``node``'s first input through single-use
    commuting operations (and the operations passed), or ``(None, [])``."""
    import torch.fx as fx

    u, passed = node.args[0] if node.args else None, []
    while isinstance(u, fx.Node) and len(u.users) == 1 and u.op != "placeholder":
        if u.op == "call_module" and kinds.get(u.target) == "hat":
            return u, passed
        if not _chain_op(u, root, kinds):
            break
        passed.append(u)
        u = u.args[0]
    return None, []


def fold_plan(graph, root: nn.Module, kinds: dict) -> dict:
    """``{norm node: HAT layer node}`` for the norms that fold a HAT layer's mask into their affine
    parameters: the layer's only use reaches the norm through commuting elementwise operations,
    and the norm computes its statistics per unit (BatchNorm after a convolution). Every other norm,
    LayerNorm in particular, sees the masked data. The HAT network and :func:`export_task` follow
    the same plan."""
    plan = {}
    for node in graph.nodes:
        if node.op != "call_module" or kinds.get(node.target) != "norm":
            continue
        src, _ = _chain_source(node, root, kinds)
        if src is None:
            continue
        layer, norm = root.get_submodule(src.target), root.get_submodule(node.target)
        _, passed = _chain_source(node, root, kinds)
        permutes = [_permute_dims(n) for n in reversed(passed) if _permute_dims(n) is not None]
        is_conv = isinstance(layer, (HATConv1d, HATConv2d, HATConv3d))
        conv_bn = is_conv and not permutes and isinstance(
            norm, (TaskIndexedBatchNorm1d, TaskIndexedBatchNorm2d, TaskIndexedBatchNorm3d, TaskIndexedBatchNormAct2d))
        # A LayerNorm (or any norm over the unit axis) never folds: its statistics would include the
        # unmasked values of units the task does not use, whose weights later tasks train, and the
        # task's outputs would move with them. It sees the masked data (exact zeros) instead.
        if conv_bn:
            plan[node] = src
    return plan


def _has_payload(args, payload: set) -> bool:
    import torch.fx as fx

    found = []
    fx.node.map_arg(args, lambda n: found.append(n in payload) or n)
    return any(found)


def _scalar_in(args) -> bool:
    return any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)


def _unitwise_call(fn, name: str, **rule):
    """A module-level function (so that graphs pickle) applying ``fn`` with :func:`_unitwise`'s rules."""
    def call(x, *args, **kwargs):
        return _unitwise(x, fn, args, kwargs, **rule)

    call.__name__ = call.__qualname__ = name
    call.__module__ = __name__
    globals()[name] = call
    return call


_UNITWISE_CALLS = {}
for _rule, _fns in (({"commute": True}, _COMMUTING_FUNCTIONS), ({"zero": True}, _ZERO_FUNCTIONS)):
    for _f in _fns:
        if _f not in _UNITWISE_CALLS:
            _UNITWISE_CALLS[_f] = _unitwise_call(_f, f"_unitwise_{len(_UNITWISE_CALLS)}_{_f.__name__}", **_rule)
for _f, _k in _POOL_FUNCTIONS.items():
    _UNITWISE_CALLS[_f] = _unitwise_call(_f, f"_unitwise_{len(_UNITWISE_CALLS)}_{_f.__name__}", commute=True, spatial=_k)
_UNITWISE_METHODS = {
    m: _unitwise_call(getattr(torch.Tensor, m), f"_unitwise_method_{m}", **({"commute": True} if m in _COMMUTING_METHODS else {"zero": True}))
    for m in sorted(_COMMUTING_METHODS | _ZERO_METHODS)
}
