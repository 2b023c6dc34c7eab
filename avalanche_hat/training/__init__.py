"""The Avalanche integration of HAT: strategy, plugin, multi-task model, capacity metric, checkpoints.

This is the only part of avalanche_hat that imports Avalanche. Usage::

    import timm, torch
    import avalanche_hat.timm_models  # registers hat_resnet18s, ...
    from avalanche.benchmarks.classic import SplitCIFAR10
    from avalanche_hat import HAT, HATConfig
    from avalanche_hat.training import maybe_load_checkpoint, save_checkpoint

    benchmark = SplitCIFAR10(5, return_task_id=True, seed=0, class_ids_from_zero_in_each_exp=True)
    net = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=5), num_classes=0)
    strategy = HAT(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), num_classes=2,
                   train_mb_size=64, train_epochs=10, device="cuda" if torch.cuda.is_available() else "cpu")
    strategy, start = maybe_load_checkpoint(strategy, "hat.ckpt")
    for experience in benchmark.train_stream[start:]:
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)
        save_checkpoint(strategy, "hat.ckpt")

Any other strategy gets HAT with ``plugins=[HATPlugin()]`` and a ``HATMultiTaskModel`` model.
"""
import warnings

# Avalanche's own import (all of its subpackages, whichever one is asked for) warns that qpsolvers
# finds no QP solver: only Avalanche's GEM and A-GEM strategies use one, HAT does not. Kept out of a
# user's first import; importing Avalanche first, or avalanche.training.GEM, still shows it.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
    import avalanche  # noqa: F401

from .checkpoint import CheckpointError, make_optimizers_picklable
from .class_incremental import HATClassIncrementalModel, evaluate_task_inference
# The rank-aware checkpoint functions: in one process they are Avalanche's (with the dill fix); under
# torchrun rank 0 writes and every rank loads.
from .distributed import (
    DistributedHATPlugin, destroy_distributed, get_rank, get_world_size, init_distributed, is_distributed,
    is_main_process, maybe_load_checkpoint, save_checkpoint,
)
from .metrics import HATCapacityMetric, HATCSVLogger, capacity_metric_values, hat_capacity_metrics
from .model import HATMultiTaskModel, plain_trainable_parts
from .plugin import DEFAULT_REG_COEF, INCOMPATIBLE_PLUGINS, HATPlugin, check_optimizer, check_plugins
from .strategy import HAT, as_hat_model, default_hat_evaluator
from .task_inference import for_each_task

__all__ = [
    "HAT", "HATPlugin", "HATMultiTaskModel", "HATCapacityMetric", "HATCSVLogger", "hat_capacity_metrics",
    "capacity_metric_values", "default_hat_evaluator", "as_hat_model", "check_optimizer",
    "save_checkpoint", "maybe_load_checkpoint", "make_optimizers_picklable", "CheckpointError", "DEFAULT_REG_COEF",
    "check_plugins", "INCOMPATIBLE_PLUGINS", "plain_trainable_parts",
    "HATClassIncrementalModel", "evaluate_task_inference", "for_each_task",
    "DistributedHATPlugin", "init_distributed", "destroy_distributed", "is_distributed", "is_main_process",
    "get_rank", "get_world_size",
]
