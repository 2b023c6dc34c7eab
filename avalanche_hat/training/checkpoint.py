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
strategy, and two more guarantees: saving is atomic (a temporary file in the same folder, fsync, then
``os.replace``), so a kill while saving keeps the previous checkpoint; loading an empty or truncated
file raises a :class:`CheckpointError` that names the file and says what to do, instead of pickle's
``EOFError: Ran out of input``.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import sys
import zipfile

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


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back (empty or truncated)."""


def save_checkpoint(strategy, fname, exclude=None) -> None:
    """Avalanche's ``save_checkpoint`` (call it between experiences, outside train/eval), atomic.

    The checkpoint is written to a temporary file in the same folder, flushed to disk (``fsync``) and
    then renamed over ``fname`` (``os.replace``, atomic on POSIX and Windows): a process killed while
    saving leaves the previous checkpoint as it was (and at worst a stray ``.<name>.*.tmp`` file,
    safe to delete), never an empty or half-written ``fname``. A file-like ``fname`` is written
    directly."""
    make_optimizers_picklable()
    if not isinstance(fname, (str, os.PathLike)):
        _avalanche_save_checkpoint(strategy, fname, exclude=exclude)
        return
    fname = os.fspath(fname)
    folder, name = os.path.split(os.path.abspath(fname))
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: a fresh file of our own; mode 0o666 minus the umask, as open() would create fname.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as f:
            _avalanche_save_checkpoint(strategy, f, exclude=exclude)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, fname)
    except BaseException:  # also KeyboardInterrupt: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX; folders cannot be opened on Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def maybe_load_checkpoint(strategy, fname, map_location=None, unique_objects=None):
    """Avalanche's ``maybe_load_checkpoint``: ``(strategy, index of the next experience to train)``,
    or ``(strategy, 0)`` if ``fname`` does not exist. An empty or truncated file raises a
    :class:`CheckpointError` that names it and says what to do."""
    is_path = isinstance(fname, (str, os.PathLike))
    if is_path and os.path.exists(fname) and os.path.getsize(fname) == 0:
        raise CheckpointError(_damaged_message(fname, "is empty (0 bytes)"))
    try:
        return _avalanche_maybe_load_checkpoint(strategy, fname, map_location=map_location,
                                                unique_objects=unique_objects)
    except (EOFError, pickle.UnpicklingError, RuntimeError, OSError) as error:
        # torch.save writes a zip archive whose directory is at its end: a cut file is no zip any more
        # (torch then raises OSError, RuntimeError or EOFError, depending on where it was cut).
        if not is_path or not os.path.isfile(fname) or zipfile.is_zipfile(fname):
            raise
        raise CheckpointError(_damaged_message(
            fname, f"is truncated or damaged ({type(error).__name__}: {error})")) from error


def _damaged_message(fname, what: str) -> str:
    return (
        f"the checkpoint {os.fspath(fname) if isinstance(fname, (str, os.PathLike)) else fname!r} {what}: it "
        "cannot be loaded (a process killed while writing it with a save_checkpoint that was not atomic, "
        "a full disk, or an interrupted copy). Delete it to start training over from the first "
        "experience, or load a previous checkpoint if you kept one. avalanche_hat.training.save_checkpoint "
        "writes atomically (a temporary file, then a rename), so a checkpoint it wrote is either the old one "
        "or the new one, never a broken one."
    )


make_optimizers_picklable()
