"""Explicit opt-ins for the two training forwards that are refused by default.

A *training forward* is a forward of a module in training mode (``module.training``) with
gradients enabled: what an optimizer step follows. Eval-mode and ``torch.no_grad()`` forwards are
never refused. Two training forwards are legitimate only on purpose, so each needs an explicit block:

* a training forward of a task that is marked trained changes what it learned (its own units, its
  mask embedding, its heads and norms): :func:`retraining` says that this is meant. Without it the
  forward raises, and the task stays exactly as it was;
* a training forward with ``mask_scale=None`` trains with binary masks, and the mask embeddings get
  no gradient: the task's weights learn under masks that never move from their initialisation
  (a forgotten ``mask_scale``, silently wrong HAT). :func:`fixed_masks` says that fixed masks are
  meant (HAT-CL's ``ConstantMasker``).

The recomputation of a gradient-checkpointed segment replays a forward that already passed these
checks (during the backward pass, maybe on another thread): it is not checked again.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

from .guard import _check_ids, scoped

_RETRAINING: ContextVar[frozenset] = ContextVar("avalanche_hat_retraining", default=frozenset())
_FIXED_MASKS: ContextVar[bool] = ContextVar("avalanche_hat_fixed_masks", default=False)
_REPLAYING: ContextVar[bool] = ContextVar("avalanche_hat_replaying", default=False)

#: How to get a mask scale, in the words of the error messages.
SCHEDULE_HINT = (
    "avalanche_hat.CosineMaskScale(hat_config.max_mask_scale).at(batch, batches_per_epoch) (or "
    "LinearMaskScale, ExponentialMaskScale, ConstantMaskScale)"
)


@contextlib.contextmanager
def retraining(*task_ids: int) -> Iterator[frozenset]:
    """Allow training forwards of ``task_ids`` although they are marked trained::

        with avalanche_hat.retraining(0):             # task 0 is trained; fine-tune it on purpose
            loss = criterion(model(HATPayload(x, task_id=0, mask_scale=s)).data, y)
            loss.backward(); optimizer.step()          # every other trained task stays bit-identical

    Outside such a block a training forward of a trained task raises. Inside it, the task trains
    what Eq. 2 leaves it: its own units (those no other trained task owns), free units, its mask
    embedding and its copies of task-indexed layers (heads, norms); what any other trained or
    locked task owns stays bit-identical. The task stays marked trained, so it is protected again
    as soon as the block ends. The HAT strategy and the ``HATPlugin`` open this block for an
    experience of a trained task when ``allow_task_revisit=True``. Blocks nest (their tasks add up)."""
    if len(task_ids) == 1 and isinstance(task_ids[0], (list, tuple, set, frozenset)):
        task_ids = tuple(task_ids[0])
    ids = _check_ids(task_ids, "retraining")
    if not ids:
        raise ValueError("retraining needs the task ids to retrain, e.g. avalanche_hat.retraining(0)")
    with scoped(_RETRAINING, _RETRAINING.get() | ids):
        yield ids


@contextlib.contextmanager
def fixed_masks() -> Iterator[None]:
    """Allow training forwards with ``mask_scale=None``: binary masks, no gradient to the embeddings.

    This trains a task's weights under masks that stay where they are, for example a mask written
    into the task's embedding rows beforehand (HAT-CL's ``ConstantMasker``, see the migration
    guide)::

        with avalanche_hat.fixed_masks():
            loss = criterion(model(HATPayload(x, task_id=t, mask_scale=None)).data, y)

    Outside such a block a training forward with a task id and ``mask_scale=None`` raises: HAT
    learns its masks with a mask scale from a schedule (``CosineMaskScale`` and kin), and a forgotten
    scale would leave them at their initialisation. Eq. 2 protects the other tasks as usual."""
    with scoped(_FIXED_MASKS, True):
        yield


@contextlib.contextmanager
def replaying() -> Iterator[None]:
    """The recomputation of a checkpointed segment (internal): its forward was checked already."""
    with scoped(_REPLAYING, True):
        yield


def retrained_message(layer, task_id: int) -> str:
    t = task_id
    return (
        f"a training-mode forward of task {t} in {type(layer).__name__}, but task {t} is marked trained: "
        f"its optimizer step would change what task {t} learned (its units, mask embedding, heads and norm "
        f"statistics). To evaluate it, call model.eval() or run the forward under torch.no_grad(). To train "
        f"it further on purpose (its own and free units; every other trained task stays bit-identical), "
        f"wrap the loop in `with avalanche_hat.retraining({t}):` (HAT(..., allow_task_revisit=True) does "
        f"this for an experience of a trained task). To learn it again from scratch, call "
        f"avalanche_hat.forget_task(model, {t}) first. (avalanche_hat.mark_task_trained(model, {t}, "
        f"trained=False) allows it too, but leaves task {t} unprotected until it is marked again.)"
    )


def _refused(task_id: int, trained: frozenset) -> bool:
    """A forward that would change trained task ``task_id``, outside :func:`retraining` (and not a replay)."""
    return task_id in trained and task_id not in _RETRAINING.get() and not _REPLAYING.get()


def check_trained_task(layer, task_id: int, trained: frozenset) -> None:
    """Refuse a training forward of a marked-trained task outside :func:`retraining` (see there)."""
    if _refused(task_id, trained):
        raise RuntimeError(retrained_message(layer, task_id))


def check_statistics_forward(layer, task_id: int, trained: frozenset) -> None:
    """Refuse a training-mode forward of a marked-trained task's norm under ``torch.no_grad()``
    outside :func:`retraining`: no gradient flows, but the forward would overwrite the running
    statistics the task was evaluated with (nothing restores them before the next optimizer step)."""
    if _refused(task_id, trained):
        raise RuntimeError(
            f"a training-mode forward of task {task_id} in {type(layer).__name__} under torch.no_grad(), but task "
            f"{task_id} is marked trained: the forward would update its running statistics (its BatchNorm's mean "
            f"and variance), which changes what task {task_id} computes in eval mode. To evaluate it, call "
            f"model.eval() first. To re-estimate its statistics on purpose, wrap the forwards in "
            f"`with avalanche_hat.retraining({task_id}):`."
        )


def check_mask_scale(layer, task_id: int, mask_scale) -> None:
    """Refuse a training forward of a task with ``mask_scale=None`` outside :func:`fixed_masks`."""
    if mask_scale is not None or _FIXED_MASKS.get() or _REPLAYING.get():
        return
    t = task_id
    raise ValueError(
        f"a training-mode forward of task {t} in {type(layer).__name__} with mask_scale=None: the masks are "
        f"binary and the mask embeddings get no gradient, so task {t} would train its weights under masks "
        f"that never move from their initialisation. Pass the mask scale s of Eq. 1 from a schedule, "
        f"s = {SCHEDULE_HINT}: HATPayload(x, task_id={t}, mask_scale=s), net(x, task_id={t}, mask_scale=s), "
        f"or model.mask_scale = s on a HATMultiTaskModel (the HATPlugin sets it every iteration). To train "
        f"with fixed masks on purpose (HAT-CL's ConstantMasker), wrap the loop in "
        f"`with avalanche_hat.fixed_masks():`. To evaluate, call model.eval() or run under torch.no_grad()."
    )
