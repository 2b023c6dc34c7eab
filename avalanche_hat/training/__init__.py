"""The Avalanche integration of HAT: strategy, plugin, multi-task model, capacity metric, checkpoints.

This is the only part of avalanche_hat that imports Avalanche.
"""
from .checkpoint import make_optimizers_picklable, maybe_load_checkpoint, save_checkpoint
from .metrics import HATCapacityMetric, HATCSVLogger, capacity_metric_values, hat_capacity_metrics
from .model import HATMultiTaskModel
from .plugin import DEFAULT_REG_COEF, HATPlugin, check_optimizer
from .strategy import HAT, as_hat_model, default_hat_evaluator

__all__ = [
    "HAT", "HATPlugin", "HATMultiTaskModel", "HATCapacityMetric", "HATCSVLogger", "hat_capacity_metrics",
    "capacity_metric_values", "default_hat_evaluator", "as_hat_model", "check_optimizer",
    "save_checkpoint", "maybe_load_checkpoint", "make_optimizers_picklable", "DEFAULT_REG_COEF",
]
