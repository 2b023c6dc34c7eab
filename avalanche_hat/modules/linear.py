"""HATLinear: ``nn.Linear`` with a per-task mask on its output units."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HATConfig
from ..mechanism.masks import masked_nullified_linear, nullified_linear
from ..payload import HATPayload
from .base import HATModule


class HATLinear(nn.Linear, HATModule):
    """``nn.Linear`` taking and returning a :class:`HATPayload`.

    Its ``weight`` and ``bias`` keep ``nn.Linear``'s names and shapes, so plain weights load as they
    are; ``mask_embedding`` and ``hat_trained`` are the HAT state.
    """

    unit_dim = -1

    def __init__(self, in_features: int, out_features: int, hat_config: HATConfig, bias: bool = True, device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_hat(hat_config, out_features, device, dtype)

    def forward(self, payload: HATPayload) -> HATPayload:
        return self._hat_forward(payload, F.linear, self.in_features, -1, nullified=nullified_linear,
                                 masked_nullified=self._masked_nullified)

    def _masked_nullified(self, x, weight, bias, out_owned, in_owned, task_id, scale):
        cfg = self.hat_config
        return masked_nullified_linear(x, weight, bias, self.mask_embedding, out_owned, in_owned, task_id, scale,
                                       cfg.max_mask_scale, cfg.gradient_compensation, cfg.compensation_clamp)

    @classmethod
    def from_base_module(cls, module: nn.Linear, hat_config: HATConfig) -> "HATLinear":
        """A HATLinear with ``module``'s weights (every task starts from them)."""
        new = cls(module.in_features, module.out_features, hat_config, bias=module.bias is not None,
                  device=module.weight.device, dtype=module.weight.dtype)
        new.load_state_dict(module.state_dict(), strict=False)
        return new

    @torch.no_grad()
    def to_base_module(self, task_id: int | None = None) -> nn.Linear:
        """A plain ``nn.Linear``; with ``task_id``, the task's binary mask is folded into it."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        plain.load_state_dict({k: v for k, v in self.state_dict().items() if k in ("weight", "bias")})
        if task_id is not None:
            m = self.binary_mask(task_id)
            plain.weight.mul_(m.unsqueeze(1))
            if plain.bias is not None:
                plain.bias.mul_(m)
        return plain
