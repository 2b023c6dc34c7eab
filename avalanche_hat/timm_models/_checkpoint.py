"""Gradient checkpointing for the HAT networks (timm's ``model.set_grad_checkpointing(True)``).

A checkpointed segment (a ViT or ResNet block, an AlexNet or MLP layer) keeps no activation for the
backward pass: autograd runs it a second time during the backward to get them back. Four things make
that second run (the *recomputation*) compute exactly what the first one did, and leave no trace:

- the random state is restored (PyTorch's ``preserve_rng_state``), so dropout and drop-path draw the
  same units;
- BatchNorm running statistics are updated by the first run only: the recomputation writes into
  throw-away copies of the buffers (plain ``torch.utils.checkpoint`` would apply the momentum twice);
- the opt-in checks of :mod:`avalanche_hat.opt_ins` (a trained task, ``mask_scale=None``) are not
  run again: the first run passed them, and the second may run on an autograd thread that does not
  see the blocks (``retraining``, ``fixed_masks``) the first one ran in;
- nothing is recorded: the masks a HAT layer leaves for the regulariser (``recorded_masks()``) and the
  outputs the plugin watches (``watch_masked_outputs()``) are the first run's, so the regulariser's
  gradient flows into the graph of the loss.

Every other per-forward effect of a HAT layer is idempotent within one step: the clamp of the mask
embeddings (no optimizer step runs between a forward and its backward) and the record of the task
being trained. PyTorch compares the shapes, dtypes and devices of the recomputed tensors with the
first run's and raises if they differ (``determinism_check="default"``), so a recomputation that took
another path fails instead of producing wrong gradients.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..modules.base import MASK_RECORD
from ..opt_ins import replaying
from ..payload import _MASKED_OUTPUTS, HATPayload

_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def recomputation(modules: Iterable[nn.Module]) -> Iterator[None]:
    """What the recomputation of a segment made of ``modules`` runs under: BatchNorm buffers swapped
    for copies (restored afterwards) and no mask or output recording."""
    swapped = []
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
                for name in _RUNNING_STATS:
                    buffer = getattr(m, name, None)
                    if buffer is not None:
                        swapped.append((m, name, buffer))
                        setattr(m, name, buffer.clone())
    records = MASK_RECORD.set(None)
    watched = _MASKED_OUTPUTS.set(None)
    try:
        with replaying():  # the first run passed the opt-in checks (it may run on another thread now)
            yield
    finally:
        _MASKED_OUTPUTS.reset(watched)
        MASK_RECORD.reset(records)
        for m, name, buffer in swapped:
            setattr(m, name, buffer)


def run_checkpointed(fn: Callable[[HATPayload], HATPayload], payload: HATPayload,
                     modules: Iterable[nn.Module]) -> HATPayload:
    """``fn(payload)`` as one checkpointed segment; ``modules``: those ``fn`` runs (their BatchNorm
    statistics are protected from the recomputation)."""
    modules = tuple(modules)
    return checkpoint(
        fn, payload, use_reentrant=False, preserve_rng_state=True, determinism_check="default",
        context_fn=lambda: (contextlib.nullcontext(), recomputation(modules)),
    )
