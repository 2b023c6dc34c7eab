"""HAT layers (masked output units) and task-indexed layers (one copy per task)."""
from .base import HATModule, TaskIndexedModule
from .conv import HATConv1d, HATConv2d, HATConv3d
from .linear import HATLinear
from .norm import (
    TaskIndexedBatchNorm1d,
    TaskIndexedBatchNorm2d,
    TaskIndexedBatchNorm3d,
    TaskIndexedGroupNorm,
    TaskIndexedLayerNorm,
    TaskIndexedLinear,
    TaskIndexedParameter,
)
from .conversion import BASE_TO_HAT, from_base_module, load_plain_state_dict

__all__ = [
    "HATModule", "TaskIndexedModule", "HATLinear", "HATConv1d", "HATConv2d", "HATConv3d",
    "TaskIndexedBatchNorm1d", "TaskIndexedBatchNorm2d", "TaskIndexedBatchNorm3d", "TaskIndexedGroupNorm",
    "TaskIndexedLayerNorm",
    "TaskIndexedLinear", "TaskIndexedParameter", "BASE_TO_HAT", "from_base_module", "load_plain_state_dict",
]
