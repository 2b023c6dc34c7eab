"""HAT Vision Transformer (timm's ``vit_tiny_patch16_224`` layout and weight names).

Every linear layer and the patch embedding are HAT layers; every LayerNorm is a
:class:`TaskIndexedLayerNorm`; the class token, the position embedding and the layer-scale factors
are :class:`TaskIndexedParameter` (each task trains its own copy, so training task 1 cannot change
task 0); the classifier is one head per task. Ownership of units is lost after the position
embedding is added and after a LayerNorm (the next layer then counts all its inputs as owned,
which is safe); through GELU it carries over from ``fc1`` to ``fc2``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from timm.models import register_model
from timm.models._registry import generate_default_cfgs, register_model_deprecations
from torch import nn

from ..config import HATConfig
from ..modules import HATConv2d, HATLinear, TaskIndexedLayerNorm, TaskIndexedParameter
from ..mechanism.masks import nullify_linear_grad_
from ..modules.base import as_payload
from ..payload import HATPayload
from ._base import HATNetwork, pair
from ._pretrained import build, cfg_from_plain

__all__ = ["HATVisionTransformer", "HATTokenLinear", "HATAttention", "HATMlp", "HATBlock", "HATPatchEmbed", "HATLayerScale"]


@torch.no_grad()
def _init_linear_(module: nn.Module) -> None:
    """timm's ViT init of linear layers (HATLinear and the heads' copies): truncated normal, zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _MaskFoldedLinear(torch.autograd.Function):
    """``F.linear(x, W * m[:, None], b * m)`` with Eq. 2's factors applied to the weight and bias
    gradients in its own backward. The masked weight is recomputed there instead of being kept, so
    training holds no weight-sized temporary between forward and backward. The mask's gradient
    uses the full ``dL/d(m W)`` (before Eq. 2), as when the mask multiplies the output."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, out_owned, in_owned):
        ctx.save_for_backward(x, weight, bias, mask, out_owned, in_owned)
        return F.linear(x, weight * mask.unsqueeze(1), None if bias is None else bias * mask)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mask, out_owned, in_owned = ctx.saved_tensors
        dtype = grad.dtype  # under autocast the saved tensors may be in another precision
        col = mask.to(dtype).unsqueeze(1)
        grad_x = grad_w = grad_b = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight.to(dtype) * col).to(x.dtype)
        g = grad.reshape(-1, grad.shape[-1])
        need_w, need_b, need_m = ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        gw = g.t().mm(x.reshape(-1, x.shape[-1]).to(dtype)) if (need_w or need_m) else None  # dL/d(m W)
        gb = g.sum(0) if bias is not None and (need_b or need_m) else None
        if need_m:
            grad_m = torch.bmm(gw.unsqueeze(1), weight.to(dtype).unsqueeze(2)).flatten()  # row-wise dot, no temporary
            if gb is not None:
                grad_m = grad_m + gb * bias.to(dtype)
            grad_m = grad_m.to(mask.dtype)
        if need_w:
            grad_w = nullify_linear_grad_(gw.mul_(col), out_owned, in_owned).to(weight.dtype)
        if bias is not None and need_b:
            grad_b = (gb * mask.to(dtype) * (1.0 - out_owned).to(dtype)).to(bias.dtype)
        return grad_x, grad_w, grad_b, grad_m, None, None


class HATTokenLinear(HATLinear):
    """A :class:`HATLinear` for token sequences that folds its mask into the weight.

    ``m * (W x + b) = (m W) x + m b``: when the layer sees more tokens than it has inputs, scaling
    the weight rows (``out x in`` per step) is cheaper than multiplying the ``tokens x out`` output
    and its gradient, and saves no extra activation for the backward. Same outputs (bit-identical
    with binary masks), same gradients: Eq. 2 scales the weight and bias gradients, and the mask's
    own gradient (Eq. 3) sees the full ``dL/d(m W)``. The output carries no pending mask: masked
    units are already exactly 0, and their ownership is kept.

    ``fold_mask``: ``None`` (default) folds when the input has more tokens than the layer has
    inputs, ``True`` always, ``False`` never (the mask stays pending, as in :class:`HATLinear`).
    """

    fold_mask: bool | None = None

    def forward(self, payload: HATPayload) -> HATPayload:
        payload = as_payload(self, payload)
        x = payload.unmasked_data
        fold = self.fold_mask
        if fold is None:
            fold = x.numel() // max(x.shape[-1], 1) > self.in_features
        if payload.task_id is None or not fold:
            return super().forward(payload)
        task_id, scale = payload.task_id, payload.mask_scale

        def folded(x, weight, bias):
            m = self.mask(task_id, scale)
            return F.linear(x, weight * m.unsqueeze(1), None if bias is None else bias * m)

        def folded_masked(x, weight, bias, out_owned, in_owned, task_id, scale):
            m = self.mask(task_id, scale)  # here, after the layer clamped its embeddings in place
            return _MaskFoldedLinear.apply(x, weight, bias, m, out_owned, in_owned), m

        def folded_nullified(x, weight, bias, out_owned, in_owned):  # training with binary masks
            return folded_masked(x, weight, bias, out_owned, in_owned, task_id, scale)[0]

        if not (self.training and torch.is_grad_enabled()):  # inference: no gradient to nullify
            x = payload.data
            if x.shape[-1] != self.in_features:
                raise ValueError(f"{type(self).__name__} expects {self.in_features} input units along the last "
                                 f"axis, got an input of shape {tuple(x.shape)}")
            return payload.derive(folded(x, self.weight, self.bias))
        # One mask per step: the one folded into the weight is also the one the regulariser reuses.
        out = self._hat_forward(payload, folded, self.in_features, -1, nullified=folded_nullified,
                                masked_nullified=folded_masked, plain_when_free=False)
        owned = out.ownership
        return out.derive(out.unmasked_data, mask_dim=out.mask_dim if owned is not None else None, ownership=owned)


class HATPatchEmbed(nn.Module):
    """Image to patch tokens: a HAT convolution with kernel and stride ``patch_size``."""

    def __init__(self, img_size, patch_size, in_chans: int, embed_dim: int, hat_config: HATConfig, bias: bool = True):
        super().__init__()
        self.img_size, self.patch_size = pair(img_size), pair(patch_size, "patch_size")
        if any(i % p for i, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        self.grid_size = tuple(i // p for i, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = HATConv2d(in_chans, embed_dim, self.patch_size, hat_config, stride=self.patch_size, bias=bias)

    def forward(self, x: HATPayload) -> HATPayload:
        if x.ndim != 4 or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the model's img_size {self.img_size}: "
                f"resize the images or create the model with img_size={tuple(x.shape[2:])}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C), mask on C


class HATLayerScale(nn.Module):
    """Per-channel scale of a residual branch (timm's LayerScale) with one copy per task."""

    def __init__(self, dim: int, hat_config: HATConfig, init_values: float):
        super().__init__()
        self.init_values = float(init_values)
        self.gamma = TaskIndexedParameter((dim,), hat_config)
        with torch.no_grad():
            for p in self.gamma.copies:
                p.fill_(self.init_values)

    def forward(self, x: HATPayload) -> HATPayload:
        return x * self.gamma(x.task_id)


class HATAttention(nn.Module):
    """Multi-head self-attention: HAT ``qkv`` and ``proj``; the attention itself runs on tensors."""

    def __init__(self, dim: int, num_heads: int, hat_config: HATConfig, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = HATTokenLinear(dim, dim * 3, hat_config, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = HATTokenLinear(dim, dim, hat_config)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: HATPayload) -> HATPayload:
        B, N, C = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.data.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = qkv.derive(out.transpose(1, 2).reshape(B, N, C))
        return self.proj(out).forward_by(self.proj_drop)


class HATMlp(nn.Module):
    """fc1 - GELU - dropout - fc2 - dropout, HAT linear layers (timm's Mlp)."""

    def __init__(self, dim: int, hidden: int, hat_config: HATConfig, drop: float = 0.0):
        super().__init__()
        self.fc1 = HATTokenLinear(dim, hidden, hat_config)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = HATTokenLinear(hidden, dim, hat_config)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: HATPayload) -> HATPayload:
        x = self.fc1(x).forward_by(self.act).forward_by(self.drop1)
        return self.fc2(x).forward_by(self.drop2)


class HATBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, hat_config: HATConfig, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, init_values: float | None = None, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = TaskIndexedLayerNorm(dim, hat_config, eps=norm_eps)
        self.attn = HATAttention(dim, num_heads, hat_config, qkv_bias, attn_drop, proj_drop)
        self.ls1 = HATLayerScale(dim, hat_config, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = TaskIndexedLayerNorm(dim, hat_config, eps=norm_eps)
        self.mlp = HATMlp(dim, int(dim * mlp_ratio), hat_config, proj_drop)
        self.ls2 = HATLayerScale(dim, hat_config, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: HATPayload) -> HATPayload:
        x = x + self.ls1(self.attn(self.norm1(x))).forward_by(self.drop_path1)
        return x + self.ls2(self.mlp(self.norm2(x))).forward_by(self.drop_path2)


class HATVisionTransformer(HATNetwork):
    """ViT with a class token and a learned position embedding (timm's ``VisionTransformer`` for the
    ``vit_*_patch*`` models), HAT layers and per-task copies of every non-HAT parameter.

    ``global_pool='token'`` (class token, final norm before pooling) or ``'avg'`` (mean of the patch
    tokens, norm after pooling as ``fc_norm``), as timm.
    """

    supports_grad_checkpointing = True

    def __init__(self, hat_config: HATConfig, img_size=224, patch_size=16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: float | None = None, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg' for the HAT ViT, got {global_pool!r}")
        self.hat_config = hat_config
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.drop_rate = float(drop_rate)
        self.patch_embed = HATPatchEmbed(img_size, patch_size, in_chans, embed_dim, hat_config)
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        self.cls_token = TaskIndexedParameter((1, 1, embed_dim), hat_config, init_std=1e-6)
        self.pos_embed = TaskIndexedParameter((1, num_tokens, embed_dim), hat_config, init_std=0.02)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*(
            HATBlock(embed_dim, num_heads, hat_config, mlp_ratio, qkv_bias, init_values, proj_drop_rate,
                     attn_drop_rate, rates[i])
            for i in range(depth)
        ))
        avg = global_pool == "avg"
        self.norm = nn.Identity() if avg else TaskIndexedLayerNorm(embed_dim, hat_config, eps=1e-6)
        self.fc_norm = TaskIndexedLayerNorm(embed_dim, hat_config, eps=1e-6) if avg else nn.Identity()
        self.head_drop = nn.Dropout(self.drop_rate)
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        _init_linear_(self)

    def _init_head(self, head: nn.Module) -> None:
        _init_linear_(head)

    def _set_global_pool(self, global_pool: str) -> None:
        if global_pool != self.global_pool:
            raise ValueError(
                f"the HAT ViT cannot switch global_pool after creation ({self.global_pool!r} -> {global_pool!r}): "
                "create it with the global_pool you need"
            )

    def forward_features(self, x, task_id: int | None = None, mask_scale: float | None = None) -> HATPayload:
        p = self.patch_embed(self._payload(x, task_id, mask_scale))
        t = p.task_id
        cls = self.cls_token(t).expand(p.shape[0], -1, -1)
        tokens = torch.cat([cls, p.data], dim=1) + self.pos_embed(t)
        p = p.derive(tokens).forward_by(self.pos_drop)
        for block in self.blocks:  # one checkpointed segment per block with set_grad_checkpointing(True)
            p = self._segment(block, p)
        return self.norm(p) if self.global_pool == "token" else p

    def _pool(self, payload: HATPayload) -> HATPayload:
        if self.global_pool == "token":
            return payload.derive(payload.data[:, 0])
        return self.fc_norm(payload.derive(payload.data[:, self.num_prefix_tokens:].mean(dim=1)))

    def adapt_plain_state_dict(self, state_dict: dict) -> dict:
        """Resample a plain position embedding made for another image size (timm's bicubic resampling)."""
        pos = state_dict.get("pos_embed")
        own = self.pos_embed.copies[0]
        if pos is not None and pos.ndim == 3 and pos.shape[1] != own.shape[1]:
            state_dict["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(self.patch_embed.grid_size), num_prefix_tokens=self.num_prefix_tokens
            )
        return state_dict


# Pretrained tags: the plain timm models' own (``arch.tag``), first the default. ``augreg``: Steiner et
# al.'s ImageNet-21k training ("How to train your ViT"); ``orig``: the original ViT paper's; ``_ft_in1k``:
# then fine-tuned on ImageNet-1k. The in21k checkpoints carry a 21843-class head (``orig_in21k``: none).
_TAGS = {
    "tiny": ("augreg_in21k_ft_in1k", "augreg_in21k"),
    "small": ("augreg_in21k_ft_in1k", "augreg_in21k", "augreg_in1k"),
    "base": ("augreg2_in21k_ft_in1k", "augreg_in21k_ft_in1k", "augreg_in21k", "orig_in21k_ft_in1k", "orig_in21k",
             "augreg_in1k"),
}
default_cfgs = generate_default_cfgs({
    f"hat_vit_{size}_patch16_224.{tag}": cfg_from_plain(f"vit_{size}_patch16_224.{tag}")
    for size, tags in _TAGS.items() for tag in tags
})


def _hat_vit(variant: str, pretrained: bool, args: dict, kwargs: dict) -> HATVisionTransformer:
    return build(HATVisionTransformer, variant, pretrained, **{**args, **kwargs})


@register_model
def hat_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> HATVisionTransformer:
    """HAT ViT-Tiny/16 (embed 192, depth 12, 3 heads, 5.7M parameters); ``pretrained`` maps timm's
    ``vit_tiny_patch16_224.augreg_in21k_ft_in1k`` weights onto it (``.augreg_in21k`` for the
    ImageNet-21k ones; position embedding resampled for another ``img_size``)."""
    return _hat_vit("hat_vit_tiny_patch16_224", pretrained, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
                    kwargs)


@register_model
def hat_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> HATVisionTransformer:
    """HAT ViT-Small/16 (embed 384, depth 12, 6 heads, 22M parameters); ``pretrained`` maps timm's
    ``vit_small_patch16_224.augreg_in21k_ft_in1k`` weights onto it (tags ``.augreg_in21k``,
    ``.augreg_in1k``)."""
    return _hat_vit("hat_vit_small_patch16_224", pretrained, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
                    kwargs)


@register_model
def hat_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> HATVisionTransformer:
    """HAT ViT-Base/16 (embed 768, depth 12, 12 heads, 86M parameters); ``pretrained`` maps timm's
    ``vit_base_patch16_224.augreg2_in21k_ft_in1k`` weights onto it (tags ``.augreg_in21k_ft_in1k``,
    ``.augreg_in21k``, ``.orig_in21k_ft_in1k``, ``.orig_in21k``, ``.augreg_in1k``)."""
    return _hat_vit("hat_vit_base_patch16_224", pretrained, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
                    kwargs)


# timm < 0.9 names (those HAT-CL's timm knew): a warning, then the current name and tag, as timm does for
# its own ``vit_*_patch16_224_in21k``.
register_model_deprecations(__name__, {
    f"hat_vit_{size}_patch16_224_in21k": f"hat_vit_{size}_patch16_224.augreg_in21k" for size in _TAGS
})
