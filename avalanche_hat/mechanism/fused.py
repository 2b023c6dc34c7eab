"""Fused CPU kernels for a HAT layer's per-step vector work (``fused_cpu.cpp``).

On a CPU a HAT layer's extra work per training step is a dozen operations on vectors of a few hundred
units (the soft mask, Eq. 3's compensation, the mask's product with the output and its two gradients).
Their arithmetic is nothing; dispatching each one through PyTorch is what costs, several microseconds
apiece. ``fused_cpu.cpp`` does each of these as one loop. It is compiled with the C++ compiler the first
time a process needs it (about 30 s, once per machine: PyTorch keeps the build in
``~/.cache/torch_extensions``, or ``$TORCH_EXTENSIONS_DIR``).

Where no compiler is found, the build fails, or ``AVALANCHE_HAT_FUSED=0`` is set, every layer uses the
PyTorch operations instead (one warning says why a build failed). Both compute the same formulas and
differ in the last bits of float rounding only. GPUs, half precision, non-contiguous tensors and
``torch.func`` transforms (``vmap``, ...) always take the PyTorch operations.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path

import torch

_functorch_active = torch._C._functorch.peek_interpreter_stack
_SOURCE = Path(__file__).with_name("fused_cpu.cpp")
_DTYPES = (torch.float32, torch.float64)
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


def _build():
    try:
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its import warns that no CUDA runtime is found: not needed here
        try:
            from torch.utils import cpp_extension
        finally:
            quiet.setLevel(level)

        # The build is cached per name: the torch version in it keeps a build from another release apart.
        name = "avalanche_hat_fused_cpu_" + re.sub(r"\W", "_", torch.__version__)
        # -fopenmp: at::parallel_for runs on PyTorch's OpenMP threads (a no-op loop without it).
        return cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
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
    """Build the kernels now (e.g. before timing or forking workers); True if they are in use."""
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
