"""Protection by construction: what the trained (or locked) tasks own stays bit-identical, whatever
the optimizer does.

Eq. 2 zeroes the gradient of what earlier tasks own, but an optimizer can move a weight whose
gradient is zero: momentum and Adam's moments left from an earlier step, weight decay (SGD's,
AdamW's decoupled one, ASGD's built-in one), state kept in inner optimizers. So every HAT layer and
task-indexed layer keeps a *reference* of what the protected tasks own, and after every optimizer
step the owned entries are copied back from it:

* HAT layers: the mask-embedding rows of the protected tasks, and the weights and biases of the
  output units they own (where their input is owned too, as Eq. 2 says; all of the row when the
  layer's input ownership is unknown);
* task-indexed layers (heads, norms and their running statistics, per-task parameters): the copies
  of the protected tasks, parameters and buffers.

The protected tasks of a step are the trained ones and the ones locked in its forwards
(:func:`locked_tasks`, ``HATPayload(..., locked_task_ids=...)``), minus the tasks that layer ran a
training forward for since the last step (retraining a trained task trains its own units, as Eq. 2
allows). The reference is derived from the layer's own parameters, never persisted: before the
first step that protects a task it does not cover yet (after ``mark_task_trained``, a lock, a load,
a ``.to()``), it is copied from the parameters, which hold what the task learned at that moment.

On the CPU (float32/float64, contiguous, ``groups == 1``) the restore is one fused loop per tensor
(``restore_rows`` in ``mechanism/fused_cpu.cpp``): it visits only the owned rows and writes only the
entries whose bits differ from the reference, so a step that moved nothing protected writes nothing.
Elsewhere it is ``torch.where`` with the protected entries as the condition: the same bits.

The restore runs from a global hook on every ``torch.optim.Optimizer`` step (subclasses and inner
optimizers included: their ``step`` runs the hook too). An optimizer outside ``torch.optim`` that
updates parameters in place is caught at the start of the next forward of each layer (the in-place
update changes the parameter's version counter); one that writes through ``.data`` is invisible to
that check, and the HAT strategy refuses optimizers that are not ``torch.optim.Optimizer``\\ s.

This module also keeps the record of which tasks had training steps (``hat_stepped``, persistent),
so that training a task after another one that was never marked trained fails closed.
"""
from __future__ import annotations

import contextlib
import weakref
from contextvars import ContextVar
from typing import Iterable, Iterator

import torch
from torch import nn

from .mechanism import fused

# Every live HAT layer and task-indexed layer (for the optimizer hook's parameter map).
_MODULES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
# Tasks locked by an open ``locked_tasks`` block, and tasks trained together in a ``joint_training`` block.
_LOCKED: ContextVar[frozenset] = ContextVar("avalanche_hat_locked_tasks", default=frozenset())
_JOINT: ContextVar[frozenset] = ContextVar("avalanche_hat_joint_training", default=frozenset())
_UNSET = object()


def _check_ids(task_ids: Iterable, what: str) -> frozenset:
    ids = []
    for t in task_ids:
        if isinstance(t, bool) or not isinstance(t, int) and not (
                isinstance(t, torch.Tensor) and t.numel() == 1 and not t.dtype.is_floating_point):
            raise TypeError(f"{what} must be integer task ids, got {t!r} ({type(t).__name__})")
        t = int(t)
        if t < 0:
            raise ValueError(f"{what} must be task ids >= 0, got {t}")
        ids.append(t)
    return frozenset(ids)


def as_locked_ids(task_ids) -> frozenset:
    """``task_ids`` (an int or an iterable of ints) as a frozenset of task ids, or a clear error."""
    if task_ids is None:
        return frozenset()
    if isinstance(task_ids, (int, torch.Tensor)) and not isinstance(task_ids, bool):
        task_ids = [task_ids] if not isinstance(task_ids, torch.Tensor) or task_ids.ndim == 0 else task_ids.tolist()
    return _check_ids(task_ids, "locked_task_ids")


def scoped(var: ContextVar, value):
    """Set the context variable ``var`` to ``value`` for a ``with`` block (restored after it, also
    on an error): the mechanism behind locked_tasks, joint_training and the opt-ins."""
    return _Scoped(var, value)


class _Scoped:
    __slots__ = ("var", "value", "token")

    def __init__(self, var: ContextVar, value) -> None:
        self.var, self.value, self.token = var, value, None

    def __enter__(self):
        self.token = self.var.set(self.value)
        return self.value

    def __exit__(self, *exc) -> None:
        self.var.reset(self.token)


@contextlib.contextmanager
def locked_tasks(*task_ids: int) -> Iterator[frozenset]:
    """Protect ``task_ids`` in every forward and optimizer step inside the block, as if they were
    marked trained, without marking them (HAT-CL's ``locked_task_ids``)::

        with avalanche_hat.locked_tasks(0):            # task 0 is finished but not marked yet
            loss = criterion(model(HATPayload(x, task_id=1, mask_scale=s)).data, y)
            loss.backward(); optimizer.step()          # task 0 stays bit-identical

    A lock covers the steps whose forwards ran inside the block (the same as
    ``HATPayload(x, task_id=1, locked_task_ids=[0])`` for one forward). A task cannot be trained
    and locked in the same forward. Blocks nest (their locks add up)."""
    ids = as_locked_ids(task_ids[0] if len(task_ids) == 1 and not isinstance(task_ids[0], int) else task_ids)
    with scoped(_LOCKED, _LOCKED.get() | ids):
        yield ids


@contextlib.contextmanager
def joint_training(*task_ids: int) -> Iterator[frozenset]:
    """Allow training forwards of ``task_ids`` to alternate without marking any of them trained.

    Outside such a block, a training forward for task ``u`` is refused while another task ``t``
    has had training steps and is neither marked trained nor locked (it would lose what it learned).
    Inside it, the tasks of the block may be trained together (one loss over several tasks, or
    alternating minibatches); tasks outside it are still refused unless marked or locked."""
    ids = as_locked_ids(task_ids[0] if len(task_ids) == 1 and not isinstance(task_ids[0], int) else task_ids)
    if len(ids) < 2:
        raise ValueError(f"joint_training needs at least two task ids, got {sorted(ids)}")
    with scoped(_JOINT, _JOINT.get() | ids):
        yield ids


def current_locks() -> frozenset:
    return _LOCKED.get()


# ------------------------------------------------------------------------------ per-layer state
class _Guard:
    """What a layer's protection keeps between steps (a plain attribute: never in ``state_dict``,
    dropped when the layer is pickled or copied, re-derived when needed)."""

    __slots__ = ("reference", "ref_tasks", "cache", "step_tasks", "step_locked", "step_in_owned", "closed",
                 "versions", "flags", "anchor", "valid")

    def __init__(self) -> None:
        self.reference: dict | None = None
        self.ref_tasks: frozenset = frozenset()
        self.cache: dict = {}
        self.step_tasks: set = set()
        self.step_locked: frozenset = frozenset()
        self.step_in_owned = _UNSET
        self.closed = False
        self.versions = None
        self.flags: dict = {}
        self.anchor = None
        self.valid = False  # the reference was checked against the layer's tensors since they last moved


def state(module: nn.Module) -> _Guard:
    g = module.__dict__.get("_hat_guard")
    if g is None:
        g = _Guard()
        module.__dict__["_hat_guard"] = g
    return g


def register(module: nn.Module) -> None:
    _MODULES.add(module)


def without_guard(pickled: dict) -> dict:
    """A module's pickled state without its guard: the reference is re-derived after unpickling."""
    return {k: v for k, v in pickled.items() if k != "_hat_guard"}


def moved(module: nn.Module) -> None:
    """The layer's tensors were converted or moved (``.to()``, ``.double()``, ...): check the
    reference against them again (and re-derive it if they no longer match) before the next step."""
    g = state(module)
    g.valid = False
    g.cache = {}


def reset(module: nn.Module) -> None:
    """Forget the derived state (after ``load_state_dict`` or unpickling): re-derived when needed."""
    module.__dict__["_hat_guard"] = _Guard()


def flag_set(module: nn.Module, name: str) -> frozenset:
    """The indices set in the bool buffer ``name`` (``hat_trained``, ``hat_stepped``), read on the host
    once per change of the buffer (its version counter), so a step costs no device synchronisation."""
    buffer = getattr(module, name)
    g = state(module)
    key = (id(buffer), buffer._version)
    cached = g.flags.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = frozenset(i for i, v in enumerate(buffer.tolist()) if v)
    g.flags[name] = (key, value)
    return value


def _is_hat(module) -> bool:
    return hasattr(module, "mask_embedding")


def _tensors(module) -> list:
    """The tensors whose versions tell whether something wrote to the layer in place."""
    if _is_hat(module):
        return [t for t in (module.weight, module.bias, module.mask_embedding) if t is not None]
    g = state(module)
    key = ("parameters", g.ref_tasks)
    tensors = g.cache.get(key)
    if tensors is None:  # the copies' Parameter objects stay while the reference does (reset with it)
        tensors = g.cache[key] = [
            p for t in sorted(g.ref_tasks) if t < len(module.copies) - 1
            for p in (module.copies[t].parameters() if isinstance(module.copies[t], nn.Module) else [module.copies[t]])]
    return tensors


def _versions(module):
    try:
        tensors = _tensors(module)
        # functional_call / vmap swapped the state in: nothing of ours to check (a task-indexed
        # layer's list holds its own Parameter objects, cached)
        if _is_hat(module) and not all(isinstance(t, nn.Parameter) for t in tensors):
            return None
        return tuple(t._version for t in tensors)
    except RuntimeError:  # inference tensors have no version counter
        return None


def network_trained(module: nn.Module) -> frozenset:
    """Trained tasks of a task-indexed layer: those of the HAT layer it was last linked to."""
    g = state(module)
    anchor = g.anchor() if g.anchor is not None else None
    return flag_set(anchor, "hat_trained") if anchor is not None else frozenset()


def link(task_indexed: nn.Module, hat_layer: nn.Module) -> None:
    state(task_indexed).anchor = weakref.ref(hat_layer)


# ----------------------------------------------------------------------------- training forwards
def unprotected_message(layer, task_id, others) -> str:
    tasks = ", ".join(map(str, others))
    first = others[0]
    text = (
        f"training task {task_id if task_id is not None else 'None (the plain network)'} in "
        f"{type(layer).__name__}, but task(s) {tasks} had training steps here and are not marked trained: "
        f"this step would change what they learned. If task {first} is done, call "
        f"avalanche_hat.mark_task_trained(model, {first}) first (the HAT strategy/HATPlugin does it at the "
        "end of each experience). "
    )
    if task_id is not None:
        text += (
            "To protect it for some forwards only, lock it: HATPayload(x, "
            f"task_id={task_id}, locked_task_ids=[{first}]) or `with avalanche_hat.locked_tasks({first}):`. "
            f"To train tasks together on purpose, wrap the loop in `with avalanche_hat.joint_training({first}, "
            f"{task_id}):`. "
        )
    return text + f"To discard what task {first} learned, call avalanche_hat.mark_task_trained(model, {first}, trained=False)."


def training_forward(layer, task_id: int | None, locked: frozenset, trained: frozenset | None = None) -> frozenset:
    """Called by a HAT layer's training forward: refuse a task trained after an unmarked one, record
    the step's tasks, and return the tasks Eq. 2 protects besides the trained ones (the locks).
    ``trained``: the layer's trained tasks if the caller read them already."""
    if trained is None:
        trained = flag_set(layer, "hat_trained")
    stepped = flag_set(layer, "hat_stepped")
    locked = locked | _LOCKED.get()
    if locked:
        for t in locked:
            layer.hat_config.check_task_id(t)
        if task_id in locked:
            raise ValueError(f"task {task_id} is both trained and locked in this forward: a locked task "
                             "cannot learn; drop it from locked_task_ids / locked_tasks")
    joint = _JOINT.get()
    others = sorted(t for t in stepped - trained - locked
                    if t != task_id and not (task_id in joint and t in joint))
    if others:
        raise RuntimeError(unprotected_message(layer, task_id, others))
    g = state(layer)
    if g.closed:  # a step restored since the last training forward: a new step begins
        g.step_tasks, g.step_locked, g.step_in_owned, g.closed = set(), frozenset(), _UNSET, False
    if task_id is not None:
        g.step_tasks.add(task_id)
    if locked:
        g.step_locked = g.step_locked | locked
    ensure_reference(layer, (trained | locked) - {task_id})  # for an optimizer outside torch.optim
    return locked


def record_input_ownership(layer, in_owned) -> None:
    """The input ownership a training forward used for Eq. 2 (None: unknown, whole rows protected)."""
    g = state(layer)
    seen = g.step_in_owned
    if seen is _UNSET:
        g.step_in_owned = in_owned
    elif seen is None or in_owned is None:
        g.step_in_owned = None
    elif seen is not in_owned:
        g.step_in_owned = torch.minimum(seen, in_owned) if seen.shape == in_owned.shape else None


def record_copy(module, task_id: int | None) -> None:
    """A task-indexed layer's training forward of ``task_id``: its copy trains in this step."""
    g = state(module)
    if g.closed:
        g.step_tasks, g.step_locked, g.closed = set(), frozenset(), False
    if task_id is not None:
        g.step_tasks.add(task_id)
    locked = _LOCKED.get()
    if locked:
        g.step_locked = g.step_locked | locked


def forward_start(module, trained: frozenset | None = None) -> None:
    """At the start of every forward: if the layer's parameters were written in place since its last
    training forward or restore (an optimizer step outside ``torch.optim``), record the step's tasks
    as trained here and restore what the protected tasks own."""
    g = state(module)
    if g.versions is None or _transformed():
        return
    now = _versions(module)
    if now is None or now == g.versions:
        return
    if trained is None:
        trained = flag_set(module, "hat_trained") if _is_hat(module) else network_trained(module)
    restore(module, protected(module, trained), after_step=True)


def _transformed() -> bool:
    """Inside vmap/grad (task inference's batched pass): the state is swapped in, nothing to restore."""
    try:
        return torch._C._functorch.maybe_current_level() is not None
    except AttributeError:
        return False


def note_clean(module) -> None:
    """Record the parameters' versions (after a training forward's clamp, a restore, a derivation)."""
    state(module).versions = _versions(module)


@torch.no_grad()
def _mark_stepped(layer, g) -> None:
    """The tasks of the step that just ran had a training step on ``layer`` (``hat_stepped``)."""
    new = [t for t in g.step_tasks if t not in flag_set(layer, "hat_stepped")]
    if new:
        layer.hat_stepped[sorted(new)] = True


# ------------------------------------------------------------------------------ reference, restore
def protected(module, trained: frozenset, locked: frozenset = frozenset()) -> frozenset:
    g = state(module)
    return frozenset((trained | locked | g.step_locked) - g.step_tasks)


def _reference_matches(module, g) -> bool:
    ref = g.reference
    if ref is None:
        return False
    if _is_hat(module):
        pairs = [(ref.get("weight"), module.weight), (ref.get("bias"), module.bias),
                 (ref.get("mask_embedding"), module.mask_embedding)]
    else:
        pairs = []
        for task in g.ref_tasks:
            current, saved = _copy_tensors(module, frozenset([task])), ref.get(task, ())
            if len(current) != len(saved):
                return False
            pairs.extend(zip(saved, current))
    for r, t in pairs:
        if t is None:
            continue
        if r is None or r.device != t.device or r.dtype != t.dtype or r.shape != t.shape:
            return False
    return True


def _copy_tensors(module, tasks: frozenset) -> list:
    """What ``tasks`` own in a task-indexed layer: their copies' parameters and buffers (cached while
    the copies are the same objects and the layer has not moved)."""
    g = state(module)
    copies = module.copies  # a ModuleList or a ParameterList: identities read from its dicts (indexing is slow)
    key = ("copies", tasks, tuple(map(id, copies._modules.values())), tuple(map(id, copies._parameters.values())))
    cached = g.cache.get(key)
    if cached is None:
        cached = g.cache[key] = _list_copy_tensors(module, tasks)
    return cached


def _list_copy_tensors(module, tasks: frozenset) -> list:
    out = []
    for t in sorted(tasks):
        if t >= len(module.copies) - 1:
            continue
        copy = module.copies[t]
        if isinstance(copy, nn.Module):
            out.extend(copy.parameters())
            out.extend(b for b in copy.buffers() if b is not None)
        else:
            out.append(copy)
    return out


@torch.no_grad()
def ensure_reference(module, tasks: frozenset) -> None:
    """Make the reference cover ``tasks``, copying it from the parameters if it does not yet."""
    if not tasks:
        return
    g = state(module)
    if tasks <= g.ref_tasks and (g.valid or _reference_matches(module, g)):
        g.valid = True
        return
    if _is_hat(module):
        g.reference = {n: t.detach().clone() for n, t in
                       (("weight", module.weight), ("bias", module.bias), ("mask_embedding", module.mask_embedding))
                       if t is not None}
    else:
        g.reference = {t: [x.detach().clone() for x in _copy_tensors(module, frozenset([t]))] for t in tasks}
    g.ref_tasks = frozenset(tasks)
    g.cache = {}
    g.valid = True
    g.versions = _versions(module)


@torch.no_grad()
def restore(module, tasks: frozenset, after_step: bool = True) -> None:
    """Copy what ``tasks`` own back from the reference (bit-identical), then close the step."""
    g = state(module)
    if after_step:
        if _is_hat(module) and not g.closed:
            _mark_stepped(module, g)
        g.closed = True
    if not tasks or g.reference is None:
        g.versions = _versions(module)
        return
    tasks = tasks & g.ref_tasks  # the pre-step hook made the reference cover them
    if tasks:
        if _is_hat(module):
            _restore_hat(module, g, tasks)
        else:
            dst = _copy_tensors(module, tasks)
            src = [x for t in sorted(tasks) for x in g.reference.get(t, ())]
            if len(dst) != len(src):
                raise RuntimeError(f"{type(module).__name__} changed its copies between two steps: cannot keep the "
                                   "trained tasks' copies identical (rebuild the optimizer after changing the model)")
            if dst:
                _copy_changed(g, tasks, dst, src)
    g.ref_tasks = tasks  # tasks not protected in this step may have changed: no longer covered
    g.versions = _versions(module)


def _copy_changed(g, tasks: frozenset, dst: list, src: list) -> None:
    """Copy the reference back into the copies' parameters written in place since the last restore
    (their version counters moved: every torch.optim update does that), and into every buffer. A
    parameter nothing wrote to, such as
    the head of a task no minibatch used (an optimizer skips parameters without a gradient), costs
    no copy, so the restore does not grow with the number of trained tasks."""
    key = ("restored", tasks)
    try:
        now = [t._version for t in dst]
    except RuntimeError:  # inference tensors have no version counter: copy everything
        torch._foreach_copy_(dst, src)
        return
    seen = g.cache.get(key)
    if seen is None or len(seen) != len(now):
        torch._foreach_copy_(dst, src)
    else:
        # buffers are always copied: BatchNorm's kernel updates its running statistics in place
        # without moving their version counters
        changed = [i for i, (a, b) in enumerate(zip(now, seen)) if a != b or not isinstance(dst[i], nn.Parameter)]
        if changed:
            torch._foreach_copy_([dst[i] for i in changed], [src[i] for i in changed])
    g.cache[key] = [t._version for t in dst]


def _restore_hat(layer, g, tasks: frozenset) -> None:
    ref = g.reference
    emb, ref_emb, weight, bias = layer.mask_embedding, ref["mask_embedding"], layer.weight, layer.bias
    cached = g.cache.get(tasks)
    if cached is None:
        rows = torch.tensor(sorted(tasks), device=emb.device, dtype=torch.long)
        out_owned = (ref_emb.index_select(0, rows) > 0).any(0)
        cached = g.cache[tasks] = {"tasks": rows, "out": out_owned, "any": bool(out_owned.any()),
                                   "out_rows": out_owned.nonzero().flatten().to(torch.long),
                                   "in": _UNSET, "where": None, "spans": None}
    groups = getattr(layer, "groups", 1)
    kernels = fused.usable(weight, ref["weight"]) if groups == 1 and fused.usable(emb, ref_emb) else None
    if kernels is not None:
        kernels.restore_rows(emb, ref_emb, cached["tasks"], _NO_COLUMNS)
    else:
        emb.index_copy_(0, cached["tasks"], ref_emb.index_select(0, cached["tasks"]))
    if not cached["any"]:
        return
    out_owned = cached["out"]
    in_owned = g.step_in_owned
    if in_owned is _UNSET or (in_owned is not None and in_owned.numel() != weight.shape[1] * groups):
        in_owned = None
    # The entries Eq. 2 protects: owned output units, where their input is owned (kernel dims
    # broadcast). The same every step while the protected tasks and the input ownership stay: built once.
    seen = cached["in"]
    if not (seen is in_owned or (seen is not _UNSET and seen is not None and in_owned is not None
                                 and torch.equal(seen, in_owned))):
        cached["in"] = None if in_owned is None else in_owned.clone()
        cached["where"] = cached["spans"] = None
    if kernels is not None:
        # Only the owned rows are visited, and only entries whose bits differ are written (the
        # common case, zero gradients and no optimizer state there, writes nothing).
        if cached["spans"] is None:
            cached["spans"] = _owned_spans(out_owned, in_owned, weight)
        rows, cols = cached["spans"]
        kernels.restore_rows(weight, ref["weight"], rows, cols)
        if bias is not None and fused.usable(bias, ref["bias"]) is not None:
            kernels.restore_rows(bias, ref["bias"], cached["out_rows"], _NO_COLUMNS)
            return
    else:
        condition = cached["where"]
        if condition is None:
            trailing = (1,) * (weight.ndim - 2)
            condition = out_owned.view(-1, 1, *trailing)
            if in_owned is not None:
                inputs = (in_owned > 0).view(groups, -1)
                if groups > 1:
                    inputs = inputs.repeat_interleave(weight.shape[0] // groups, dim=0)
                else:
                    inputs = inputs.expand(weight.shape[0], -1)
                condition = condition & inputs.reshape(weight.shape[0], -1, *trailing)
            cached["where"] = condition
        torch.where(condition, ref["weight"], weight, out=weight)
    if bias is not None:
        torch.where(out_owned, ref["bias"], bias, out=bias)


_NO_COLUMNS = torch.empty(0, dtype=torch.long)  # restore_rows: every column of the rows


def _owned_spans(out_owned: torch.Tensor, in_owned: torch.Tensor | None, weight: torch.Tensor):
    """The restore kernel's form of the protected entries of a ``groups == 1`` weight: the owned
    output rows, and the columns of the ``(out, in * kernel)`` view whose input unit is owned (an
    empty vector: every column, when the input ownership is unknown or all owned)."""
    rows = out_owned.nonzero().flatten().to(torch.long).contiguous()
    empty = _NO_COLUMNS
    if in_owned is None:
        return rows, empty
    inputs = (in_owned > 0).flatten()
    if bool(inputs.all()):
        return rows, empty
    if not bool(inputs.any()):
        return rows[:0], empty
    per_unit = 1
    for size in weight.shape[2:]:
        per_unit *= size
    units = inputs.nonzero().flatten().to(torch.long)
    cols = (units.unsqueeze(1) * per_unit + torch.arange(per_unit, dtype=torch.long)).flatten().contiguous()
    return rows, cols


# ------------------------------------------------------------------------------ optimizer hooks
_MAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _signature(optimizer) -> tuple:
    return tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)


def _layers_of(optimizer) -> tuple[list, list]:
    """The HAT layers and task-indexed layers with a parameter in ``optimizer`` (cached per optimizer)."""
    try:
        sig = _signature(optimizer)
    except (AttributeError, KeyError, TypeError):
        return [], []
    cached = _MAPS.get(optimizer)
    if cached is not None and cached[0] == sig and all(r() is not None for r in cached[1] + cached[2]):
        return [r() for r in cached[1]], [r() for r in cached[2]]
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    hats, indexed = [], []
    for m in list(_MODULES):
        params = m.parameters(recurse=not _is_hat(m))
        if any(id(p) in ids for p in params):
            if not _is_hat(m) and any(c is not m and getattr(c, "copies", None) is m.copies
                                      for c in m.modules()):
                continue  # a wrapper sharing the copies of the task-indexed layer inside it
            (hats if _is_hat(m) else indexed).append(m)
    if hats:
        for m in indexed:
            link(m, hats[0])
    _MAPS[optimizer] = (sig, [weakref.ref(m) for m in hats], [weakref.ref(m) for m in indexed])
    return hats, indexed


def _network_sets(hats, indexed) -> tuple[frozenset, frozenset]:
    trained, locked = frozenset(), frozenset()
    for h in hats:
        trained = trained | flag_set(h, "hat_trained")
        locked = locked | state(h).step_locked
    if not hats:
        for m in indexed:
            trained = trained | network_trained(m)
    return trained, locked


def _pre_step(optimizer, args, kwargs) -> None:
    hats, indexed = _layers_of(optimizer)
    if not hats and not indexed:
        return
    trained, locked = _network_sets(hats, indexed)
    if not trained and not locked and not any(state(m).step_locked for m in indexed):
        return
    for m in hats:
        ensure_reference(m, protected(m, flag_set(m, "hat_trained")))
    for m in indexed:
        ensure_reference(m, protected(m, trained, locked))


def _post_step(optimizer, args, kwargs) -> None:
    hats, indexed = _layers_of(optimizer)
    if not hats and not indexed:
        return
    trained, locked = _network_sets(hats, indexed)
    for m in hats:
        restore(m, protected(m, flag_set(m, "hat_trained")))
    for m in indexed:
        restore(m, protected(m, trained, locked))


_HOOKS = []


def install() -> None:
    """Register the global optimizer-step hooks (once per process; done when avalanche_hat is imported)."""
    if _HOOKS:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    _HOOKS.append(register_optimizer_step_pre_hook(_pre_step))
    _HOOKS.append(register_optimizer_step_post_hook(_post_step))


install()
