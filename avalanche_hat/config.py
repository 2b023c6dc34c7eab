"""HATConfig: the hyper-parameters every HAT layer of one network shares."""
from __future__ import annotations

from dataclasses import dataclass

import torch

MASK_INITS = ("dense", "normal", "sparse")


@dataclass(frozen=True)
class HATConfig:
    """Shared settings of the HAT layers of one network.

    Args:
        num_tasks: how many tasks the network can learn (task ids ``0 .. num_tasks - 1``).
        max_mask_scale: ``s_max``, the scale at which masks count as binary (original HAT: 400).
        mask_init: initial mask embeddings (of every task, and of a task forgotten with
            ``forget_task``). ``"dense"`` (this package's default: every embedding 1, every unit on;
            the initialisation the HAT-CL paper proposes, Sec. 4.1), ``"normal"`` (N(0, 1): the
            original HAT code's, and HAT-CL 0.1.1's default, ``DEF_HAT_INIT_STRAT`` in
            ``hat/constants.py``) or ``"sparse"`` (every embedding -1: every unit off until the loss
            switches it on; HAT-CL's ``"sparse"`` is another thing, a normal with a negative mean).
        embedding_clamp: embeddings are kept in ``[-c, c]`` (original HAT: 6).
        gradient_compensation: rescale embedding gradients so that masks train at every scale
            (original HAT Eq. 3, computed in closed form).
        compensation_clamp: the original code's clamp of ``s e`` inside Eq. 3 (50): a mask whose
            ``|s e|`` exceeds it is saturated and its embedding stops training. ``None`` removes it.
    """

    num_tasks: int
    max_mask_scale: float = 400.0
    mask_init: str = "dense"
    embedding_clamp: float = 6.0
    gradient_compensation: bool = True
    compensation_clamp: float | None = 50.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_tasks, int) or isinstance(self.num_tasks, bool) or self.num_tasks < 1:
            raise ValueError(f"HATConfig.num_tasks must be a positive int, got {self.num_tasks!r}")
        if not self.max_mask_scale > 0:
            raise ValueError(f"HATConfig.max_mask_scale must be > 0, got {self.max_mask_scale!r}")
        if self.mask_init not in MASK_INITS:
            raise ValueError(f"HATConfig.mask_init must be one of {MASK_INITS}, got {self.mask_init!r}")
        if not self.embedding_clamp > 0:
            raise ValueError(f"HATConfig.embedding_clamp must be > 0, got {self.embedding_clamp!r}")

    def check_task_id(self, task_id: int | None) -> None:
        """Raise a clear error unless ``task_id`` is None or a valid task index."""
        if task_id is None:
            return
        if isinstance(task_id, torch.Tensor):
            raise TypeError(
                "task_id must be a Python int, not a tensor: split mixed-task batches by task "
                "(avalanche_hat.training.HATMultiTaskModel does) and pass int(task_id)"
            )
        if not isinstance(task_id, int) or isinstance(task_id, bool):
            hint = ": pass int(task_id)" if hasattr(task_id, "__index__") else ""
            raise TypeError(f"task_id must be an int or None, got {type(task_id).__name__}{hint}")
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(
                f"task_id {task_id} is out of range for HATConfig(num_tasks={self.num_tasks}): "
                f"use 0..{self.num_tasks - 1}, or None for the plain network; "
                "to learn more tasks, build the network with a larger num_tasks"
            )

    @torch.no_grad()
    def init_embedding_(self, embedding: torch.Tensor) -> torch.Tensor:
        """Fill ``embedding`` in place with this config's initial mask embeddings."""
        if self.mask_init == "dense":
            return embedding.fill_(1.0)
        if self.mask_init == "sparse":
            return embedding.fill_(-1.0)
        return embedding.normal_(0.0, 1.0)
