"""Avalanche checkpoints (``save_checkpoint`` / ``maybe_load_checkpoint``) for HAT strategies.

Avalanche pickles the whole strategy with dill. dill pickles a class by reference only if it can find
it again as ``getattr(import_module(cls.__module__), cls.__qualname__)``, importing the module as an
attribute of its package. ``torch.optim`` deletes its submodules from its namespace (``del sgd``), so
``torch.optim.sgd`` is not an attribute of ``torch.optim``: dill then pickles ``SGD``, ``Adam``, ...
by value, with their functions and globals, and fails (``Can't pickle sentinel``), even for Naive.
Putting the imported submodules back as attributes of their package, as the import system does for
any other package, lets dill pickle the classes by reference; loading is unaffected.

The HAT strategy and the HATPlugin do this whenever they are pickled, so Avalanche's own
``save_checkpoint`` works; the two functions here are Avalanche's, with the fix applied first, for any
strategy.
"""
from __future__ import annotations

import sys

from avalanche.checkpointing import maybe_load_checkpoint as _avalanche_maybe_load_checkpoint
from avalanche.checkpointing import save_checkpoint as _avalanche_save_checkpoint

PACKAGES = ("torch.optim",)


def make_optimizers_picklable(packages=PACKAGES) -> None:
    """Re-attach each imported submodule of ``packages`` to its parent package (idempotent)."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(tuple(p + "." for p in packages)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = sys.modules.get(parent_name)
        if parent is not None and child not in vars(parent):
            setattr(parent, child, module)


def save_checkpoint(strategy, fname, exclude=None) -> None:
    """Avalanche's ``save_checkpoint`` (call it between experiences, outside train/eval)."""
    make_optimizers_picklable()
    _avalanche_save_checkpoint(strategy, fname, exclude=exclude)


def maybe_load_checkpoint(strategy, fname, map_location=None, unique_objects=None):
    """Avalanche's ``maybe_load_checkpoint``: ``(strategy, index of the next experience to train)``,
    or ``(strategy, 0)`` if ``fname`` does not exist."""
    return _avalanche_maybe_load_checkpoint(strategy, fname, map_location=map_location, unique_objects=unique_objects)


make_optimizers_picklable()
