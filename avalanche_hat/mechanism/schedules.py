"""Mask-scale schedules: each maps progress ``p`` in ``[0, 1]`` through a unit of training to ``s``."""
from __future__ import annotations

import math


class MaskScaleSchedule:
    """Base class. ``schedule(p)`` gives the scale at progress ``p``; ``schedule.at(b, B)`` at batch
    ``b`` (0-based) of a unit of ``B`` batches, with ``p = b / (B - 1)`` so the last batch has ``p = 1``."""

    def __call__(self, progress: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def at(self, batch_index: int, num_batches: int) -> float:
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        if num_batches == 1:
            return self(1.0)
        return self((batch_index % num_batches) / (num_batches - 1))


class _BoundedSchedule(MaskScaleSchedule):
    """A schedule that reaches ``max_scale`` (``s_max``)."""

    def __init__(self, max_scale: float = 400.0) -> None:
        if not max_scale > 0:
            raise ValueError(f"max_scale must be > 0, got {max_scale}")
        self.max_scale = float(max_scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_scale={self.max_scale:g})"


class CosineMaskScale(_BoundedSchedule):
    """HAT-CL Eq. 6: ``s = s_max / 2 * (1 + cos(2 pi p))``: high, near 0 mid-unit, high again."""

    def __call__(self, progress: float) -> float:
        return self.max_scale / 2.0 * (1.0 + math.cos(2.0 * math.pi * progress))


class LinearMaskScale(_BoundedSchedule):
    """Original HAT Eq. 4: ``s = 1/s_max + (s_max - 1/s_max) p``, from nearly 0 up to ``s_max``."""

    def __call__(self, progress: float) -> float:
        return 1.0 / self.max_scale + (self.max_scale - 1.0 / self.max_scale) * progress


class ConstantMaskScale(MaskScaleSchedule):
    """The same scale everywhere."""

    def __init__(self, scale: float) -> None:
        if not scale >= 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        self.scale = float(scale)

    def __call__(self, progress: float) -> float:
        return self.scale

    def __repr__(self) -> str:
        return f"ConstantMaskScale(scale={self.scale:g})"


SCHEDULES = {"cosine": CosineMaskScale, "linear": LinearMaskScale}


def make_schedule(schedule: "str | MaskScaleSchedule", max_scale: float) -> MaskScaleSchedule:
    """A schedule object from a name (``"cosine"``, ``"linear"``) or the object itself."""
    if isinstance(schedule, MaskScaleSchedule):
        return schedule
    try:
        return SCHEDULES[schedule](max_scale)
    except KeyError:
        raise ValueError(
            f"unknown mask-scale schedule {schedule!r}: use one of {sorted(SCHEDULES)} "
            "or a MaskScaleSchedule object"
        ) from None
