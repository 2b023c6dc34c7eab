"""The HAT ViTs load timm's pretrained weights through timm's own mechanism: every tag points at the
plain model's checkpoint, a Hugging Face Hub file in timm's format (``model.safetensors``) is found by
the tag and mapped onto every task's copy, the timm<0.9 ``*_in21k`` names still work, and a full-size
ViT-Base computes what the plain ViT-Base computes, for every task.

timm cannot download here: the hub test writes a fresh plain model into a Hugging Face cache folder
laid out as ``huggingface_hub`` lays it out, and runs timm offline against it."""
import warnings

import pytest
import safetensors.torch
import timm
import torch
from timm.models import get_pretrained_cfg

import avalanche_hat.timm_models  # noqa: F401  (registers the hat_* networks)
from avalanche_hat import HATConfig
from avalanche_hat.modules import HATModule, TaskIndexedModule

from test_timm_models import fold_masks, one_thread, randomise_norms_and_tokens  # noqa: F401

IN21K = {f"hat_vit_{size}_patch16_224.augreg_in21k" for size in ("tiny", "small", "base")}
IN21K_FT_IN1K = {f"hat_vit_{size}_patch16_224.augreg_in21k_ft_in1k" for size in ("tiny", "small", "base")}


def test_every_vit_tag_points_at_the_plain_models_weights():
    tags = set(timm.list_pretrained("hat_vit_*"))
    assert IN21K | IN21K_FT_IN1K | {"hat_vit_base_patch16_224.orig_in21k"} <= tags
    for name in sorted(tags):
        ours, plain = get_pretrained_cfg(name), get_pretrained_cfg(name[len("hat_"):])
        assert plain is not None, name
        assert ours.hf_hub_id == plain.hf_hub_id == f"timm/{name[len('hat_'):]}", name
        for field in ("num_classes", "input_size", "mean", "std", "crop_pct", "interpolation", "license"):
            assert getattr(ours, field) == getattr(plain, field), (name, field)
        assert ours.url is None or ours.url == plain.url  # .npz (custom_load) sources: the hub copy only
    for name in IN21K:
        assert get_pretrained_cfg(name).num_classes == 21843
    # the untagged name takes timm's default tag
    assert timm.create_model("hat_vit_base_patch16_224", hat_config=HATConfig(num_tasks=1), depth=1,
                             img_size=32).pretrained_cfg["tag"] == "augreg2_in21k_ft_in1k"


def fake_hub_cache(root, repo_id: str, state_dict: dict) -> None:
    """``state_dict`` as the hub's ``model.safetensors`` of ``repo_id`` in a huggingface_hub cache."""
    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / "model.safetensors"))


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_in21k_weights_load_from_the_hub_by_tag_and_by_the_old_name(tmp_path, offline):
    """An ImageNet-21k checkpoint (21843-class head) found through the tag's hub id: every task and
    ``task_id=None`` compute the plain model's features; the 10-class heads keep their initialisation."""
    torch.manual_seed(0)
    kw = dict(depth=2, img_size=32)  # ViT-Small's widths, two blocks
    plain = randomise_norms_and_tokens(timm.create_model("vit_small_patch16_224", num_classes=21843, **kw)).eval()
    fake_hub_cache(tmp_path, "timm/vit_small_patch16_224.augreg_in21k", plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain.forward_head(plain.forward_features(x), pre_logits=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = [
            timm.create_model(name, pretrained=True, cache_dir=str(tmp_path), hat_config=HATConfig(num_tasks=2),
                              num_classes=10, **kw).eval()
            for name in ("hat_vit_small_patch16_224.augreg_in21k", "hat_vit_small_patch16_224_in21k")
        ]
    assert any("hat_vit_small_patch16_224_in21k" in str(w.message) for w in caught), "the old name warns"
    fresh = timm.create_model("hat_vit_small_patch16_224", hat_config=HATConfig(num_tasks=2), num_classes=10, **kw)
    for model in models:
        assert model.pretrained_cfg["tag"] == "augreg_in21k" and model.num_classes == 10
        with torch.no_grad():
            for t in (None, 0, 1):
                feats = model.forward_head(model.forward_features(x, task_id=t), pre_logits=True)
                torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5)
        assert model.head.copies[0].weight.shape == (10, 384)
        assert not torch.equal(model.blocks[0].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight)


@pytest.fixture(scope="module")
def vit_base(tmp_path_factory):
    """A plain full-size ViT-Base (86M parameters; 32x32 inputs keep the forward cheap) saved as timm's
    hub file, and the HAT ViT-Base loaded from it through ``pretrained_cfg_overlay=dict(file=...)``.
    Built once for the module."""
    torch.manual_seed(0)
    plain = randomise_norms_and_tokens(timm.create_model("vit_base_patch16_224", img_size=32)).eval()
    path = tmp_path_factory.mktemp("vit_base") / "model.safetensors"
    safetensors.torch.save_file(plain.state_dict(), str(path))
    model = timm.create_model("hat_vit_base_patch16_224", pretrained=True, img_size=32,
                              pretrained_cfg_overlay=dict(file=str(path)), hat_config=HATConfig(num_tasks=2)).eval()
    return plain, model


def test_full_size_vit_base_computes_the_plain_vit_base_for_every_task(vit_base):
    plain, model = vit_base
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = plain(x)
        for fold in (False, True):  # masks pending (small inputs) and folded into the weights (224x224)
            fold_masks(model, fold)
            for t in (None, 0, 1):
                torch.testing.assert_close(model(x, task_id=t), expected, rtol=0, atol=1e-5)


def test_full_size_vit_base_shares_exactly_the_plain_weights(vit_base):
    """Every plain weight is one shared HAT weight (its 86M parameters) or one per-task copy
    (norms, tokens, the head): the HAT network adds per-task copies and mask embeddings only."""
    plain, model = vit_base
    n_plain = sum(p.numel() for p in plain.parameters())
    assert 86_000_000 < n_plain < 87_000_000
    copies = {n for n, m in model.named_modules() if isinstance(m, TaskIndexedModule)}
    shared = sum(p.numel() for n, p in model.named_parameters()
                 if not n.endswith("mask_embedding") and not any(n.startswith(c + ".") for c in copies))
    per_task = sum(p.numel() for n, p in model.named_parameters() if any(n.startswith(c + ".") for c in copies))
    copy_count = model.hat_config.num_tasks + 1  # one per task and one for task_id=None
    assert shared + per_task // copy_count == n_plain
    units = sum(m.num_units for m in model.modules() if isinstance(m, HATModule))
    assert sum(p.numel() for n, p in model.named_parameters() if n.endswith("mask_embedding")) == 2 * units
