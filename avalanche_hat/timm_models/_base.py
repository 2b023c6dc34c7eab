"""What every HAT network registered with timm shares: the input contract, the per-task head, the
timm classifier interface and the hook that adapts plain weights before they are mapped."""
from __future__ import annotations

import torch
from torch import nn

from ..config import HATConfig
from ..modules import TaskIndexedLinear
from ..payload import HATPayload
from ._checkpoint import run_checkpointed


def check_hat_config(hat_config, model_name: str) -> HATConfig:
    """The ``hat_config`` keyword every ``hat_*`` model needs, checked."""
    if hat_config is None:
        raise TypeError(
            f"{model_name} needs hat_config: timm.create_model('{model_name}', "
            "hat_config=avalanche_hat.HATConfig(num_tasks=...), ...)"
        )
    if not isinstance(hat_config, HATConfig):
        raise TypeError(
            f"{model_name}: hat_config must be an avalanche_hat.HATConfig, e.g. HATConfig(num_tasks=5); "
            f"got {type(hat_config).__name__}"
        )
    return hat_config


def check_num_classes(num_classes) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no classifier, pooled features), got {num_classes!r}")
    return num_classes


def pair(size, what: str = "img_size") -> tuple[int, int]:
    """``32`` or ``(32, 32)`` as ``(32, 32)``."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"{what} must be a positive int or a pair (height, width), got {size!r}")
    return size


class HATNetwork(nn.Module):
    """Base of the HAT networks: ``forward(x, task_id=None, mask_scale=None)`` returns a tensor.

    ``x`` is a :class:`HATPayload` (its task id and mask scale are used) or a tensor (the keyword
    arguments are used). Subclasses build ``self.<classifier_attr>`` with :meth:`_make_head` and
    implement ``forward_features(payload) -> HATPayload`` and ``_pool(payload) -> HATPayload``
    (the pooled features, before the head's dropout).
    """

    hat_config: HATConfig
    num_classes: int
    num_features: int
    classifier_attr: str = "head"
    takes_hat_payload = True  # HATPayload.forward_by hands it the payload itself
    drop_rate: float = 0.0
    grad_checkpointing: bool = False
    supports_grad_checkpointing: bool = False  # a network that runs its segments through _segment

    # ------------------------------------------------------------------------------ input
    def _payload(self, x, task_id: int | None = None, mask_scale: float | None = None) -> HATPayload:
        if isinstance(x, HATPayload):
            if (task_id is not None and task_id != x.task_id) or (
                mask_scale is not None and float(mask_scale) != x.mask_scale
            ):
                raise ValueError(
                    f"the input payload is for task {x.task_id} (mask_scale {x.mask_scale}) but "
                    f"task_id={task_id}, mask_scale={mask_scale} were passed as well: pass one or the other"
                )
            payload = x
        elif isinstance(x, torch.Tensor):
            payload = HATPayload(x, task_id=task_id, mask_scale=mask_scale)
        else:
            raise TypeError(
                f"{type(self).__name__} takes a tensor or a HATPayload, got {type(x).__name__}"
            )
        self.hat_config.check_task_id(payload.task_id)
        return payload

    # ---------------------------------------------------------------------------- forward
    def forward_features(self, x, task_id: int | None = None, mask_scale: float | None = None) -> HATPayload:
        raise NotImplementedError

    def _pool(self, payload: HATPayload) -> HATPayload:
        return payload

    def forward_head(self, x: HATPayload, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout and the task's head: logits, or the pooled features with ``pre_logits``."""
        p = self._pool(x)
        if self.drop_rate > 0:
            p = p.forward_by(self.head_drop)
        if pre_logits or self.num_classes == 0:
            return p.data
        return self.get_classifier()(p)

    def forward(self, x, task_id: int | None = None, mask_scale: float | None = None) -> torch.Tensor:
        """Logits of ``task_id``'s head (``num_classes > 0``) or the pooled features (``num_classes=0``)."""
        return self.forward_head(self.forward_features(self._payload(x, task_id, mask_scale)))

    # -------------------------------------------------------------------- checkpointing
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's gradient checkpointing: while gradients are enabled, each block (ViT, ResNet) or
        layer (AlexNet, MLP) keeps no activation and is recomputed in the backward pass. Same loss and
        same gradients as without it (the recomputation restores the random state, leaves BatchNorm
        statistics and the regulariser's recorded masks alone); less memory for more compute."""
        if not isinstance(enable, bool):
            raise TypeError(f"set_grad_checkpointing takes True or False, got {enable!r}")
        if enable and not self.supports_grad_checkpointing:
            raise NotImplementedError(
                f"{type(self).__name__} does not support gradient checkpointing: its forward does not run its "
                "blocks through HATNetwork._segment, so nothing would be checkpointed. Train it without "
                "set_grad_checkpointing(True), or route each block through self._segment(block, payload)"
            )
        self.grad_checkpointing = enable

    def _segment(self, fn, payload: HATPayload, *modules: nn.Module) -> HATPayload:
        """``fn(payload)``, checkpointed when gradient checkpointing is on and gradients are enabled.
        ``modules``: the modules ``fn`` runs (``fn`` itself when it is a module)."""
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return fn(payload)
        return run_checkpointed(fn, payload, modules or (fn,))

    # ------------------------------------------------------------------------- classifier
    def _make_head(self, num_classes: int) -> nn.Module:
        """One linear head per task (and one for ``task_id=None``), or nothing for ``num_classes=0``."""
        num_classes = check_num_classes(num_classes)
        if num_classes == 0:
            return nn.Identity()
        ref = next(self.parameters(), None)
        kwargs = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
        return TaskIndexedLinear(self.num_features, num_classes, self.hat_config, **kwargs)

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_attr)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace every task's head by a fresh one with ``num_classes`` outputs (0: no head)."""
        if global_pool is not None:
            self._set_global_pool(global_pool)
        head = self._make_head(num_classes)
        self.num_classes = num_classes
        setattr(self, self.classifier_attr, head)
        self._init_head(head)

    def _set_global_pool(self, global_pool: str) -> None:
        raise ValueError(f"{type(self).__name__} has no choice of global pooling")

    def _init_head(self, head: nn.Module) -> None:
        """Initialise a new head (PyTorch's default unless a network says otherwise)."""

    # ---------------------------------------------------------------------- plain weights
    def adapt_plain_state_dict(self, state_dict: dict) -> dict:
        """Adapt a plain checkpoint before it is mapped onto this network (resize, drop a stem...)."""
        return state_dict
