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


class ExponentialMaskScale(_BoundedSchedule):
    """HAT-CL's exponential schedule: ``s = s_max ** ((p - 1 + r) / r)``, rising geometrically to
    ``s_max`` at ``p = 1``.

    ``r`` (``ratio_above_one``, HAT-CL's ``ratio_greater_than_one``, default 0.8) is the share of
    the unit during which ``s > 1``: the scale stays below 1, where the masks train fastest, for the
    first ``1 - r`` of the unit and starts at ``s_max ** (-(1 - r) / r)`` (HAT-CL 0.1.1,
    ``hat.utils.get_hat_mask_scale(strat="exponential")``; the paper gives no equation for it).
    """

    def __init__(self, max_scale: float = 400.0, ratio_above_one: float = 0.8) -> None:
        super().__init__(max_scale)
        if not 0.0 < ratio_above_one <= 1.0:
            raise ValueError(f"ratio_above_one must be in (0, 1], got {ratio_above_one}")
        self.ratio_above_one = float(ratio_above_one)

    def __call__(self, progress: float) -> float:
        r = self.ratio_above_one
        return self.max_scale ** ((progress - 1.0 + r) / r)

    def __repr__(self) -> str:
        return f"ExponentialMaskScale(max_scale={self.max_scale:g}, ratio_above_one={self.ratio_above_one:g})"


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


SCHEDULES = {"cosine": CosineMaskScale, "linear": LinearMaskScale, "exponential": ExponentialMaskScale}


def make_schedule(schedule: "str | MaskScaleSchedule", max_scale: float) -> MaskScaleSchedule:
    """A schedule object from a name (``"cosine"``, ``"linear"``, ``"exponential"``) or the object itself."""
    if isinstance(schedule, MaskScaleSchedule):
        return schedule
    try:
        return SCHEDULES[schedule](max_scale)
    except KeyError:
        raise ValueError(
            f"unknown mask-scale schedule {schedule!r}: use one of {sorted(SCHEDULES)} "
            "or a MaskScaleSchedule object"
        ) from None
