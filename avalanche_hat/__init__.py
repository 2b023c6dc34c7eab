"""avalanche-hat: Hard Attention to the Task (HAT) for continual learning, for Avalanche.

The core (config, payload, layers, masks, schedules, regularisation, forgetting, capacity) imports
neither Avalanche nor timm. ``HAT`` and ``HATPlugin`` load Avalanche on first use; the timm networks
register with ``import avalanche_hat.timm_models``.
"""
from .capacity import CapacityReport, LayerCapacity, capacity_report
from .config import HATConfig
from .converter import ConversionError, ConversionReport, convert
from .export import export_task
from .forgetting import ForgetResult, LayerForgetting, forget_task
from .guard import joint_training, locked_tasks
from .mechanism.schedules import (ConstantMaskScale, CosineMaskScale, ExponentialMaskScale, LinearMaskScale,
                                  MaskScaleSchedule)
from .network import (
    clamp_embeddings_,
    hat_modules,
    hat_param_groups,
    hat_regularization,
    mark_task_trained,
    recorded_masks,
    trained_tasks,
)
from .opt_ins import fixed_masks, retraining
from .payload import HATPayload, check_network_output

__version__ = "0.1.0"

_LAZY = {
    "HAT": "avalanche_hat.training",
    "HATPlugin": "avalanche_hat.training",
    "HATMultiTaskModel": "avalanche_hat.training",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'avalanche_hat' has no attribute {name!r}")


__all__ = [
    "HATConfig", "HATPayload", "check_network_output", "convert", "export_task", "ConversionReport", "ConversionError",
    "forget_task", "ForgetResult", "LayerForgetting", "capacity_report", "CapacityReport", "LayerCapacity",
    "ConstantMaskScale", "CosineMaskScale", "ExponentialMaskScale", "LinearMaskScale", "MaskScaleSchedule",
    "clamp_embeddings_", "hat_modules", "locked_tasks", "joint_training", "retraining", "fixed_masks", "hat_param_groups", "hat_regularization", "mark_task_trained", "recorded_masks", "trained_tasks",
    "HAT", "HATPlugin", "HATMultiTaskModel", "__version__",
]
