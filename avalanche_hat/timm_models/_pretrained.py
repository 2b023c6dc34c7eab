"""Pretrained weights through timm's own mechanism.

A ``hat_*`` model's pretrained cfg points at the plain timm model's weights (Hugging Face hub id and
URL). timm downloads them (or reads ``pretrained_cfg_overlay=dict(file=...)``) and hands them to
:func:`hat_checkpoint_filter`, which maps the plain state dict onto the HAT network: HAT layers keep
the plain names, and every copy of a task-indexed layer, the ``task_id=None`` copy included, gets
the plain layer's state. timm then adapts the first convolution to ``in_chans`` as for any model.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from timm.models import build_model_with_cfg, get_pretrained_cfg
from timm.models._builder import resolve_pretrained_cfg
from torch import nn

from ..modules import TaskIndexedModule, TaskIndexedParameter
from ._base import check_hat_config

_logger = logging.getLogger(__name__)

HAT_STATE = ("mask_embedding", "hat_trained", "hat_stepped")  # state a plain checkpoint cannot provide
_CFG_FIELDS = (
    "hf_hub_id", "url", "input_size", "test_input_size", "fixed_input_size", "interpolation", "crop_pct",
    "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size", "first_conv", "classifier",
    "license",
)


class PretrainedWeightsUnavailableError(RuntimeError):
    """The plain model's weights could not be fetched (no network, no cache)."""


def cfg_from_plain(plain: str | None, **overrides) -> dict:
    """A pretrained cfg that loads the weights of the plain timm model ``plain`` (``'arch.tag'``).

    Only timm-native checkpoints are referenced (``custom_load`` formats such as ``.npz`` are left
    out, their Hugging Face copy is used instead). ``plain=None``: no published weights.
    """
    cfg: dict = {}
    if plain is not None:
        source = get_pretrained_cfg(plain)
        if source is None:
            cfg["hf_hub_id"] = f"timm/{plain}"
        else:
            cfg = {k: v for k, v in source.to_dict().items() if k in _CFG_FIELDS}
            if source.custom_load:
                cfg.pop("url", None)
        cfg["notes"] = (f"weights of the plain timm model {plain}, mapped onto the HAT network",)
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------ mapping
def is_hat_state_dict(state_dict: dict) -> bool:
    return any(k.rpartition(".")[2] in HAT_STATE for k in state_dict)


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def plain_to_hat_state_dict(model: nn.Module, plain: dict) -> dict:
    """The full state dict of ``model`` with the plain checkpoint ``plain`` mapped onto it.

    Every plain key must find its place with its shape, and every weight of ``model`` must be
    filled, except: mask embeddings and the record of trained tasks (kept as they are), the
    classifier when the model's ``num_classes`` differs from the pretrained cfg's (the heads keep
    their fresh initialisation, as timm does; set ``num_classes`` in ``pretrained_cfg_overlay`` to
    load a matching local head), and the first convolution's input channels (timm adapts them
    to ``in_chans`` afterwards).
    """
    target = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifiers = _as_tuple(cfg.get("classifier"))
    # as timm: a classifier trained for another number of classes than the model's is not loaded
    keep_head = getattr(model, "num_classes", None) == cfg.get("num_classes")
    first_convs = _as_tuple(cfg.get("first_conv"))
    indexed = {name: m for name, m in model.named_modules() if isinstance(m, TaskIndexedModule)}
    out: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in plain.items():
        owner, _, leaf = key.rpartition(".")
        if isinstance(indexed.get(key), TaskIndexedParameter):
            mapped = {f"{key}.{k}": v for k, v in indexed[key].expand_plain_state(value).items()}
        elif owner in indexed and not isinstance(indexed[owner], TaskIndexedParameter):
            mapped = {f"{owner}.{k}": v for k, v in indexed[owner].expand_plain_state({leaf: value}).items()}
        else:
            mapped = {key: value}
        placed = all(k in target for k in mapped)
        if owner in classifiers and not keep_head:
            continue  # the heads keep their fresh initialisation
        if placed and all(target[k].shape == v.shape for k, v in mapped.items()):
            out.update(mapped)
        elif owner in classifiers:
            continue  # a classifier of another shape: the heads keep their fresh initialisation
        elif placed and owner in first_convs and leaf == "weight" and value.ndim == target[key].ndim and (
            value.shape[:1] + value.shape[2:] == target[key].shape[:1] + target[key].shape[2:]
        ):
            out.update(mapped)  # only the input channels differ: timm adapts them to in_chans
        elif not placed:
            unexpected.append(key)
        else:
            k0 = next(iter(mapped))
            mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(target[k0].shape)}")
    heads = tuple(f"{c}." for c in classifiers)
    missing = [
        k for k in target
        if k not in out and k.rpartition(".")[2] not in HAT_STATE and not k.startswith(heads)
    ]
    if unexpected or mismatched or missing:
        name = (cfg.get("architecture") or type(model).__name__)
        raise RuntimeError(
            f"the plain weights do not fit {name}: "
            + "; ".join(
                f"{what} {items[:6]}{'...' if len(items) > 6 else ''}"
                for what, items in (("unexpected keys", unexpected), ("shape mismatches", mismatched),
                                    ("keys the weights do not fill", missing))
                if items
            )
            + ". Pass the state_dict of the plain model of the same architecture "
            "(e.g. timm.create_model('resnet18') for hat_resnet18, cl_alexnet for hat_alexnet)."
        )
    for k, v in target.items():
        out.setdefault(k, v)
    return out


def hat_checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """timm ``pretrained_filter_fn`` of the ``hat_*`` models.

    A checkpoint of the HAT network itself (it has mask embeddings) loads as it is; a plain one is
    adapted by the network (``adapt_plain_state_dict``) and mapped by :func:`plain_to_hat_state_dict`.
    """
    if is_hat_state_dict(state_dict):
        return state_dict
    return plain_to_hat_state_dict(model, model.adapt_plain_state_dict(dict(state_dict)))


def plain_checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """timm ``pretrained_filter_fn`` of the ``cl_*`` plain twins: let the network adapt the checkpoint
    (e.g. a small-image stem keeps its own initialisation), then fill what it left out."""
    state_dict = model.adapt_plain_state_dict(dict(state_dict))
    own = model.state_dict()
    for k, v in own.items():
        state_dict.setdefault(k, v)
    return state_dict


# ----------------------------------------------------------------------------------- building
def _local_source(pretrained_cfg, overlay: dict) -> tuple[bool, str | None]:
    """(a local source is given, its file path if any)."""
    cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else {}
    for src in (overlay, cfg):
        if src.get("file"):
            return True, src["file"]
        if src.get("state_dict") is not None:
            return True, None
    return False, None


def build(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    *,
    hat: bool = True,
    **kwargs,
) -> nn.Module:
    """``build_model_with_cfg`` for our networks, with clear errors for what timm leaves vague."""
    if hat:
        check_hat_config(kwargs.get("hat_config"), variant)
    elif "hat_config" in kwargs:
        raise TypeError(f"{variant} is a plain network and takes no hat_config; use hat_{variant[3:]} for HAT")
    if kwargs.get("features_only"):
        raise ValueError(
            f"{variant} does not support features_only: call model.forward_features(x, task_id=...) "
            "for the features of the last stage"
        )
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    local, file = _local_source(kwargs.get("pretrained_cfg"), overlay)
    if pretrained:
        if file is not None and not os.path.isfile(file):
            raise FileNotFoundError(
                f"{variant}: pretrained_cfg_overlay file {file!r} does not exist: pass the path of a saved "
                "state_dict of the plain model (torch.save(plain_model.state_dict(), path))"
            )
        resolved = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay)
        if not (local or resolved.hf_hub_id or resolved.url):
            plain = f"cl_{variant[4:]}" if variant.startswith("hat_") else variant
            raise ValueError(
                f"{variant} has no published pretrained weights: train the plain twin {plain!r} (or "
                "another source) and pass pretrained_cfg_overlay=dict(file=path of its state_dict)"
            )
    filter_fn = hat_checkpoint_filter if hat else plain_checkpoint_filter
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    except OSError as e:  # requests / huggingface_hub / urllib network and cache errors
        if not pretrained or local:
            raise
        source = (f"the Hugging Face Hub (https://huggingface.co/{resolved.hf_hub_id})" if resolved.hf_hub_id
                  else resolved.url)
        plain = resolved.hf_hub_id.split("/", 1)[-1] if resolved.hf_hub_id else "<the plain timm model>"
        reason = (str(e).splitlines() or [""])[0][:200]
        raise PretrainedWeightsUnavailableError(
            f"{variant}: could not download the plain model's pretrained weights from {source} "
            f"({type(e).__name__}: {reason}). This machine seems to be offline: on a machine with internet "
            f"run torch.save(timm.create_model('{plain}', pretrained=True).state_dict(), path), copy the file "
            f"here and pass pretrained_cfg_overlay=dict(file=path); or use pretrained=False."
        ) from e
