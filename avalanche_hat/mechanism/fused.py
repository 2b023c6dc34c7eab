"""Fused CPU kernels for a HAT layer's per-step vector work (``fused_cpu.cpp``).

On a CPU a HAT layer's extra work per training step is a dozen operations on vectors of a few hundred
units (the soft mask, Eq. 3's compensation, the mask's product with the output and its two gradients).
Their arithmetic is nothing; dispatching each one through PyTorch is what costs, several microseconds
apiece. ``fused_cpu.cpp`` does each of these as one loop. It also holds the guard's restore after every
optimizer step (:mod:`avalanche_hat.guard`): a loop over the owned rows of each HAT weight that
writes back only the protected entries whose bits changed, where ``torch.where`` over the whole
weight was a memory pass as long as SGD's own update.

The kernels are compiled with the C++ compiler once per installed environment, the first time a
process needs them (about 1.5 to 3 minutes on a 2-core machine; a message on stderr says so while it
happens), and cached under ``$TORCH_EXTENSIONS_DIR/avalanche_hat/`` (default
``~/.cache/torch_extensions/avalanche_hat/``). The cache entry is named by a hash of everything the
build depends on (the ``.cpp`` source, the compiler flags, the torch version, build and install
location, the Python version and the compiler), so two virtual environments on one machine, or two
releases of this package, never overwrite each other's build, and a later process loads the cached
module without running the build tools at all. Two processes that build at once share one build
(a file lock, as in ``torch.utils.cpp_extension``).

Where no compiler is found, the build fails, or ``AVALANCHE_HAT_FUSED=0`` is set, every layer uses the
PyTorch operations instead (one warning says why a build failed). Both compute the same formulas and
differ in the last bits of float rounding only. GPUs, half precision, non-contiguous tensors and
``torch.func`` transforms (``vmap``, ...) always take the PyTorch operations.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch

_functorch_active = torch._C._functorch.peek_interpreter_stack
_SOURCE = Path(__file__).with_name("fused_cpu.cpp")
_DTYPES = (torch.float32, torch.float64)
# -fopenmp: at::parallel_for runs on PyTorch's OpenMP threads (a no-op loop without it).
_CFLAGS = ("-O3", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
# How long a first build takes, for the message printed before it (measured on the project's 2-core
# machine under load; see docs/how-to/install.md).
_BUILD_TIME = "about 1.5 to 3 minutes on 2 cores"
# "enabled": None until the first use reads AVALANCHE_HAT_FUSED; "kernels": the module once built.
_state: dict = {"enabled": None, "kernels": None, "tried": False}


def _enabled() -> bool:
    if _state["enabled"] is None:  # read once: AVALANCHE_HAT_FUSED=0 switches the kernels off
        value = os.environ.get("AVALANCHE_HAT_FUSED", "1").strip().lower()
        _state["enabled"] = value not in ("0", "false", "no", "off")
    return _state["enabled"]


def kernels():
    """The compiled module, built on first use; ``None`` when it is switched off or cannot be built."""
    if not _enabled():
        return None
    if not _state["tried"]:
        _state["tried"] = True
        _state["kernels"] = _build()
    return _state["kernels"]


def _compiler() -> dict:
    """The C++ compiler torch's build would call (``$CXX`` or ``c++``): its resolved path, size and
    modification time, which change when the compiler is upgraded (no subprocess needed)."""
    name = os.environ.get("CXX", "c++")
    found = shutil.which(name)
    if found is None:
        return {"cxx": name, "path": None}
    path = os.path.realpath(found)
    stat = os.stat(path)
    return {"cxx": name, "path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def build_environment() -> dict:
    """Everything besides the source that a build of the kernels depends on: the flags, torch's version,
    build (git version) and install location, the Python version and ABI, the platform and the compiler.
    Two environments that differ in any of these get separate cache entries."""
    return {
        "cflags": list(_CFLAGS),
        "ldflags": list(_LDFLAGS),
        "env_flags": {k: os.environ.get(k, "") for k in ("CXXFLAGS", "CFLAGS", "LDFLAGS")},
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", ""),
        "torch_location": os.path.realpath(os.path.dirname(torch.__file__)),
        "python": sys.version,
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX") or "",
        "platform": sys.platform,
        "compiler": _compiler(),
    }


def cache_name(source: bytes, environment: dict) -> str:
    """The cache entry's (and the module's) name: a hash of the ``.cpp`` source and
    :func:`build_environment`, so a changed source or another environment never reuses a build."""
    digest = hashlib.sha256(source)
    digest.update(json.dumps(environment, sort_keys=True).encode())
    return "avalanche_hat_fused_cpu_" + digest.hexdigest()[:20]


def cache_root() -> Path:
    """Where builds are kept: ``$TORCH_EXTENSIONS_DIR/avalanche_hat`` (default
    ``~/.cache/torch_extensions/avalanche_hat``, torch's own cache folder)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "torch_extensions")
    return Path(root) / "avalanche_hat"


def cache_dir() -> Path:
    """This environment's build folder (see :func:`cache_name`)."""
    return cache_root() / cache_name(_SOURCE.read_bytes(), build_environment())


def _load_cached(name: str, folder: Path):
    """The module built earlier into ``folder`` (the marker is written only after a complete build
    loaded), or ``None``."""
    marker, library = folder / "built.json", folder / f"{name}.so"
    if not (marker.is_file() and library.is_file()):
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # a broken entry: build again
        return None


def _say(message: str) -> None:
    print(f"avalanche_hat: {message}", file=sys.stderr, flush=True)


def _build():
    try:
        name = cache_name(_SOURCE.read_bytes(), build_environment())
        folder = cache_root() / name
        module = _load_cached(name, folder)
        if module is not None:
            return module
        folder.mkdir(parents=True, exist_ok=True)
        _say(f"compiling the fused CPU kernels of HAT's layers (fused_cpu.cpp) for this environment "
             f"(or waiting for another process that compiles them), {_BUILD_TIME}. This happens once per "
             f"environment: later processes load the build cached in {folder}. Set AVALANCHE_HAT_FUSED=0 "
             "to skip it (HAT layers then use PyTorch operations: the same formulas, slower on the CPU).")
        start = time.perf_counter()
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its import warns that no CUDA runtime is found: not needed here
        try:
            from torch.utils import cpp_extension
        finally:
            quiet.setLevel(level)
        # torch's build holds a file lock in the folder: a second process building at once waits for
        # the first one's build and then loads it.
        module = cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=list(_CFLAGS),
                                    extra_ldflags=list(_LDFLAGS), build_directory=str(folder), verbose=False)
        marker = folder / "built.json"
        partial = folder / f"built.json.{os.getpid()}"
        partial.write_text(json.dumps(build_environment(), sort_keys=True, indent=1))
        os.replace(partial, marker)  # atomic: a reader sees no marker or a complete one
        _say(f"fused CPU kernels ready ({time.perf_counter() - start:.0f} s), cached in {folder}")
        return module
    except Exception as err:  # no compiler, no ninja, a read-only cache, ...: the PyTorch path still works
        reason = str(err).strip().splitlines()
        warnings.warn(
            f"avalanche_hat could not build its fused CPU kernels ({type(err).__name__}: "
            f"{reason[-1] if reason else 'no message'}); HAT layers use PyTorch operations instead, which "
            "are correct but slower on the CPU. Install a C++ compiler and ninja to get them, or set "
            "AVALANCHE_HAT_FUSED=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def usable(tensor: torch.Tensor, other: torch.Tensor | None = None):
    """The kernels if ``tensor`` (and ``other``, with the same dtype) is a contiguous float32/float64
    CPU tensor, else ``None``. Runs several times per layer and step: kept to attribute reads."""
    if _state["enabled"] is False or not tensor.is_cpu or tensor.dtype not in _DTYPES or not tensor.is_contiguous():
        return None
    if _functorch_active() is not None:  # vmap, torch.func.grad, ...: C++ autograd functions cannot run there
        return None
    if other is not None and (not other.is_cpu or other.dtype != tensor.dtype or not other.is_contiguous()):
        return None
    return _state["kernels"] if _state["tried"] else kernels()


def saturation_args(saturation: float | None) -> tuple[float, bool]:
    """The kernels' form of Eq. 3's clamp of ``s e`` (``None``: no clamp): its value and whether it applies."""
    return (0.0, False) if saturation is None else (float(saturation), True)


def build() -> bool:
    """Build (or load from the cache) the kernels now, e.g. before timing or forking workers; True if
    they are in use. ``python -c "from avalanche_hat.mechanism import fused; fused.build()"`` builds the
    cache entry of an environment ahead of its first training run."""
    return kernels() is not None


@contextlib.contextmanager
def disabled():
    """Use the PyTorch operations inside the block (to compare both paths, or to rule the kernels out)."""
    previous = _enabled()  # the environment's choice, restored after the block
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = previous
