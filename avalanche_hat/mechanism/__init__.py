"""The paper's equations: masks, ownership, gradient handling, schedules, regularisation."""
from .masks import binary_mask, nullification_factor, ownership, scale_grad, soft_mask
from .regularization import global_usage_penalty, hatcl_usage_penalty, layerwise_usage_penalty
from .schedules import ConstantMaskScale, CosineMaskScale, ExponentialMaskScale, LinearMaskScale, MaskScaleSchedule, make_schedule

__all__ = [
    "binary_mask", "nullification_factor", "ownership", "scale_grad", "soft_mask",
    "global_usage_penalty", "hatcl_usage_penalty", "layerwise_usage_penalty",
    "ConstantMaskScale", "CosineMaskScale", "ExponentialMaskScale", "LinearMaskScale", "MaskScaleSchedule", "make_schedule",
]
