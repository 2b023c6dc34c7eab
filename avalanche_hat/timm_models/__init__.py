"""HAT networks registered with timm: ``import avalanche_hat.timm_models``, then
``timm.create_model('hat_resnet18', hat_config=HATConfig(num_tasks=5), num_classes=10)``.

HAT networks: ``hat_resnet18``, ``hat_resnet34`` (ImageNet stem), ``hat_resnet18s``,
``hat_resnet34s`` (small-image stem), ``hat_vit_tiny_patch16_224``, ``hat_vit_small_patch16_224``,
``hat_vit_base_patch16_224`` (pretrained tags such as ``.augreg_in21k`` and ``.augreg_in21k_ft_in1k``),
``hat_alexnet`` (the original HAT paper's network) and ``hat_mlp``. Plain twins of the networks timm
lacks, for baselines on exactly the same architecture: ``cl_resnet18s``, ``cl_resnet34s``,
``cl_alexnet``, ``cl_mlp``.

Every HAT network: ``model(x, task_id=None, mask_scale=None)`` takes a tensor (with the keyword
arguments) or a :class:`~avalanche_hat.HATPayload` and returns a tensor (logits of the task's head,
or pooled features with ``num_classes=0``); ``forward_features(payload) -> HATPayload``,
``forward_head(payload, pre_logits=False) -> tensor``. ``pretrained=True`` maps the plain timm
model's weights onto every task's copy (``pretrained_cfg_overlay=dict(file=...)`` for a local file).
``model.set_grad_checkpointing(True)`` recomputes each block in the backward pass: same loss and
gradients, less memory.
"""
from ._base import HATNetwork
from ._pretrained import PretrainedWeightsUnavailableError, plain_to_hat_state_dict
from .alexnet import AlexNet, HATAlexNet, cl_alexnet, hat_alexnet
from .mlp import HATMLP, MLP, cl_mlp, hat_mlp
from .resnet import HATResNet, SmallStemResNet, cl_resnet18s, cl_resnet34s, hat_resnet18, hat_resnet18s, hat_resnet34, hat_resnet34s
from .vit import HATVisionTransformer, hat_vit_base_patch16_224, hat_vit_small_patch16_224, hat_vit_tiny_patch16_224

HAT_MODELS = (
    "hat_resnet18", "hat_resnet34", "hat_resnet18s", "hat_resnet34s", "hat_vit_tiny_patch16_224",
    "hat_vit_small_patch16_224", "hat_vit_base_patch16_224", "hat_alexnet", "hat_mlp",
)
PLAIN_TWINS = {
    "hat_resnet18": "resnet18", "hat_resnet34": "resnet34", "hat_resnet18s": "cl_resnet18s",
    "hat_resnet34s": "cl_resnet34s", "hat_vit_tiny_patch16_224": "vit_tiny_patch16_224",
    "hat_vit_small_patch16_224": "vit_small_patch16_224", "hat_vit_base_patch16_224": "vit_base_patch16_224",
    "hat_alexnet": "cl_alexnet", "hat_mlp": "cl_mlp",
}

__all__ = [
    "HATNetwork", "HATResNet", "HATVisionTransformer", "HATAlexNet", "HATMLP", "AlexNet", "MLP", "SmallStemResNet",
    "PretrainedWeightsUnavailableError", "plain_to_hat_state_dict", "HAT_MODELS", "PLAIN_TWINS",
    "hat_resnet18", "hat_resnet34", "hat_resnet18s", "hat_resnet34s", "hat_vit_tiny_patch16_224", "hat_vit_small_patch16_224",
    "hat_vit_base_patch16_224", "hat_alexnet", "hat_mlp", "cl_resnet18s", "cl_resnet34s", "cl_alexnet", "cl_mlp",
]
