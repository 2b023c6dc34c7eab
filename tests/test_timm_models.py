"""The HAT networks registered with timm: they build like timm models, load the plain models' weights
into every task's copy, compute exactly what the plain model computes with all masks on, and do not
forget: a task's outputs are bit-identical after training the next one."""
import copy

import pytest
import timm
import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload, fixed_masks, forget_task, mark_task_trained
from avalanche_hat.modules import HATLinear, HATModule, TaskIndexedLinear, TaskIndexedModule
from avalanche_hat.timm_models import HAT_MODELS, PLAIN_TWINS, PretrainedWeightsUnavailableError
from avalanche_hat.timm_models.vit import HATTokenLinear

from nets import train_task

# model -> (in_chans, image size, extra kwargs): small inputs keep the tests fast
SMALL = {
    "hat_resnet18": (3, 32, {}),
    "hat_resnet34": (3, 32, {}),
    "hat_resnet18s": (3, 8, {}),
    "hat_resnet34s": (3, 8, {}),
    "hat_vit_tiny_patch16_224": (3, 32, {"img_size": 32}),
    # ViT-Small and -Base at their widths and head counts, two blocks instead of 12 (full size:
    # tests/test_pretrained_vit.py builds ViT-Base once)
    "hat_vit_small_patch16_224": (3, 32, {"img_size": 32, "depth": 2}),
    "hat_vit_base_patch16_224": (3, 32, {"img_size": 32, "depth": 2}),
    "hat_alexnet": (3, 32, {}),
    "hat_mlp": (1, 28, {}),
}
ALL_TASKS = (None, 0, 1, 2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The machine's cores are shared: with one thread no small op waits for a busy sibling core
    (with two, OpenMP waits made these tests 40x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def create_hat(name, num_tasks=3, num_classes=4, **kwargs):
    chans, _, extra = SMALL[name]
    return timm.create_model(name, hat_config=HATConfig(num_tasks=num_tasks), num_classes=num_classes,
                             in_chans=chans, **{**extra, **kwargs})


def inputs(name, n=4, seed=0):
    chans, size, _ = SMALL[name]
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomise_norms_and_tokens(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move norm parameters, running statistics and tokens away from their initial 1/0 values, so
    that the equivalence test also checks that each of them reached every task's copy."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            rand(m.weight, 0.5, 1.5)
            rand(m.bias, -0.2, 0.2)
        if isinstance(m, nn.BatchNorm2d):
            rand(m.running_mean, -0.2, 0.2)
            rand(m.running_var, 0.5, 1.5)
    for name in ("cls_token", "pos_embed"):
        if isinstance(getattr(model, name, None), nn.Parameter):
            rand(getattr(model, name), -0.05, 0.05)
    return model


def saved_plain(name, tmp_path, **kwargs):
    """A freshly built plain twin (randomised norms) saved to a file: what pretrained loading reads."""
    chans, _, extra = SMALL[name]
    torch.manual_seed(1)
    plain = timm.create_model(PLAIN_TWINS[name], in_chans=chans, **{**extra, **kwargs})
    randomise_norms_and_tokens(plain).eval()
    path = tmp_path / f"{PLAIN_TWINS[name]}.pth"
    torch.save(plain.state_dict(), path)
    return plain, str(path)


# ------------------------------------------------------------------------------- building
@pytest.mark.parametrize("name", HAT_MODELS)
def test_every_network_builds_through_timm_and_keeps_the_forward_contract(name):
    model = create_hat(name).eval()
    x = inputs(name)
    assert name in timm.list_models("hat_*")
    assert isinstance(model.get_classifier(), TaskIndexedLinear) and model.num_classes == 4
    with torch.no_grad():
        for t in ALL_TASKS:
            out = model(x, task_id=t)
            assert isinstance(out, torch.Tensor) and out.shape == (4, 4)
            assert torch.equal(out, model(HATPayload(x, task_id=t)))
        feats = model.forward_features(HATPayload(x, task_id=1))
        assert isinstance(feats, HATPayload)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (4, model.num_features)
        assert torch.equal(model.forward_head(feats), model(x, task_id=1))
        model.reset_classifier(7)
        assert model(x, task_id=2).shape == (4, 7) and model.num_classes == 7
        model.reset_classifier(0)
        assert torch.equal(model(x, task_id=1), pooled)
    # no plain parameter is shared between tasks: every parameter is a HAT layer's or a task's copy
    owners = {n for n, m in model.named_modules() if isinstance(m, (HATModule, TaskIndexedModule))}
    for pname, _ in model.named_parameters():
        assert any(pname.startswith(o + ".") for o in owners), f"{pname} is shared by every task"


@pytest.mark.parametrize("name", HAT_MODELS)
def test_num_classes_zero_returns_pooled_features_as_timm(name):
    model = create_hat(name, num_classes=0).eval()
    with torch.no_grad():
        out = model(inputs(name), task_id=0)
    assert out.shape == (4, model.num_features) and isinstance(model.get_classifier(), nn.Identity)


def test_hat_config_is_required_and_checked():
    with pytest.raises(TypeError, match=r"needs hat_config.*HATConfig\(num_tasks"):
        timm.create_model("hat_resnet18", num_classes=10)
    with pytest.raises(TypeError, match="must be an avalanche_hat.HATConfig"):
        timm.create_model("hat_mlp", hat_config={"num_tasks": 2})
    with pytest.raises(TypeError, match="takes no hat_config"):
        timm.create_model("cl_mlp", hat_config=HATConfig(num_tasks=2))


def test_bad_input_gets_a_clear_error():
    model = create_hat("hat_alexnet").eval()
    with pytest.raises(ValueError, match="out of range"):
        model(inputs("hat_alexnet"), task_id=3)
    with pytest.raises(ValueError, match="pass one or the other"):
        model(HATPayload(inputs("hat_alexnet"), task_id=0), task_id=1)
    with pytest.raises(ValueError, match=r"in_chans=1 and img_size=\(28, 28\)"):
        model(torch.randn(2, 1, 28, 28), task_id=0)
    with pytest.raises(ValueError, match="img_size"):
        create_hat("hat_vit_tiny_patch16_224")(torch.randn(2, 3, 64, 64), task_id=0)
    with pytest.raises(ValueError, match="in_chans and img_size"):
        create_hat("hat_mlp")(torch.randn(2, 3, 28, 28), task_id=0)
    with pytest.raises(ValueError, match="features_only"):
        create_hat("hat_resnet18", features_only=True)


@pytest.mark.parametrize("name,chans,size", [("hat_alexnet", 3, 32), ("hat_alexnet", 1, 28), ("hat_mlp", 1, 28),
                                             ("hat_mlp", 3, 32)])
def test_alexnet_and_mlp_take_cifar_and_mnist_shapes(name, chans, size):
    model = timm.create_model(name, hat_config=HATConfig(num_tasks=2), in_chans=chans, img_size=size).eval()
    plain = timm.create_model(PLAIN_TWINS[name], in_chans=chans, img_size=size)
    assert model(torch.randn(2, chans, size, size), task_id=1).shape == (2, 10)
    hat_keys = {k for k in model.state_dict() if not k.endswith(("mask_embedding", "hat_trained", "hat_stepped"))}
    plain_keys = {k.replace("head.copies.0.", "head.") for k in hat_keys if ".copies." not in k or ".copies.0." in k}
    assert plain_keys == set(plain.state_dict())  # the plain twin has exactly the HAT net's plain keys


# ----------------------------------------------------------------------- pretrained weights
def fold_masks(model, fold):
    """Force the ViT's token-wise layers to fold their masks into the weights (True) or not (False):
    at the small test sizes they would not fold by themselves."""
    for m in model.modules():
        if isinstance(m, HATTokenLinear):
            m.fold_mask = fold
    return model


@pytest.mark.parametrize("name", HAT_MODELS)
def test_plain_weights_give_the_plain_outputs_for_every_task(name, tmp_path):
    """Equivalence: all masks on (dense init), every task id and task_id=None compute the plain model."""
    plain, path = saved_plain(name, tmp_path, num_classes=4)
    overlay = dict(file=path, num_classes=4)  # as timm: the head loads only for the cfg's num_classes
    model = create_hat(name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    x = inputs(name)
    with torch.no_grad():
        expected = plain(x)
        for fold in ((False, True) if "vit" in name else (None,)):
            fold_masks(model, fold)
            for t in ALL_TASKS:
                torch.testing.assert_close(model(x, task_id=t), expected, rtol=0, atol=1e-5)


def test_in_chans_and_num_classes_adapt_pretrained_weights_as_timm(tmp_path):
    torch.manual_seed(0)
    plain3 = randomise_norms_and_tokens(timm.create_model("resnet18"))
    path = tmp_path / "resnet18.pth"
    torch.save(plain3.state_dict(), path)
    overlay = dict(file=str(path))
    plain = timm.create_model("resnet18", in_chans=1, num_classes=5, pretrained=True, pretrained_cfg_overlay=overlay)
    model = timm.create_model("hat_resnet18", hat_config=HATConfig(num_tasks=2), in_chans=1, num_classes=5,
                              pretrained=True, pretrained_cfg_overlay=overlay)
    assert model.conv1.in_channels == 1 and model.num_classes == 5
    plain.eval(), model.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        # the 1000-class head does not fit 5 classes: heads stay fresh, everything else is loaded
        features = plain.forward_head(plain.forward_features(x), pre_logits=True)
        for t in (None, 0, 1):
            hat_features = model.forward_head(model.forward_features(x, task_id=t), pre_logits=True)
            torch.testing.assert_close(hat_features, features, rtol=0, atol=1e-5)


def test_vit_position_embedding_is_resampled_for_another_img_size(tmp_path):
    torch.manual_seed(0)
    plain224 = randomise_norms_and_tokens(timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=3))
    path = tmp_path / "vit.pth"
    torch.save(plain224.state_dict(), path)
    overlay = dict(file=str(path), num_classes=3)
    plain = timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=3, img_size=48, pretrained=True,
                              pretrained_cfg_overlay=overlay).eval()
    model = timm.create_model("hat_vit_tiny_patch16_224", hat_config=HATConfig(num_tasks=2), depth=2, num_classes=3,
                              img_size=48, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        for t in (None, 0, 1):
            torch.testing.assert_close(model(x, task_id=t), plain(x), rtol=0, atol=1e-5)


def test_a_hat_checkpoint_loads_as_it_is(tmp_path):
    model = create_hat("hat_resnet18s")
    with torch.no_grad():
        model.layer1[0].conv1.mask_embedding[1].neg_()
        model.bn1.copies[2].weight.mul_(3)
    path = tmp_path / "hat.pth"
    torch.save(model.state_dict(), path)
    again = create_hat("hat_resnet18s", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_weights_of_another_architecture_are_refused_clearly(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), path)
    with pytest.raises(RuntimeError, match="do not fit hat_resnet18: unexpected keys"):
        timm.create_model("hat_resnet18", hat_config=HATConfig(num_tasks=2), pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(path)))


def test_missing_file_or_weights_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        timm.create_model("hat_resnet18", hat_config=HATConfig(num_tasks=2), pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "nothing.pth")))
    with pytest.raises(ValueError, match="no published pretrained weights.*cl_alexnet"):
        timm.create_model("hat_alexnet", hat_config=HATConfig(num_tasks=2), pretrained=True)


def test_pretrained_true_offline_fails_with_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network, fail at once
    with pytest.raises(PretrainedWeightsUnavailableError, match=r"offline.*pretrained_cfg_overlay=dict\(file="):
        timm.create_model("hat_resnet18", hat_config=HATConfig(num_tasks=2), pretrained=True,
                          cache_dir=str(tmp_path))  # an empty cache


# ------------------------------------------------------------------------- zero forgetting
def two_tasks(name, n=16):
    """Two tiny tasks: each separates two random prototypes (plus noise) of the model's input shape."""
    chans, size, _ = SMALL[name]
    g = torch.Generator().manual_seed(3)
    tasks = []
    for _ in range(2):
        protos = torch.randn(2, chans, size, size, generator=g)
        y = torch.arange(n) % 2
        tasks.append((protos[y] + 0.5 * torch.randn(n, chans, size, size, generator=g), y))
    return tasks


def sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


@pytest.mark.parametrize("name,fold", [(n, True) for n in HAT_MODELS] + [("hat_vit_tiny_patch16_224", False)])
def test_outputs_of_task_0_are_bit_identical_after_training_task_1(name, fold):
    torch.manual_seed(0)
    chans, _, extra = SMALL[name]
    # original-HAT init: each task starts with about half of the units, so tasks share some units
    # and leave others free, and training task 1 really changes weights task 0 uses
    model = timm.create_model(name, hat_config=HATConfig(num_tasks=2, mask_init="normal"), num_classes=2,
                              in_chans=chans, **extra)
    fold_masks(model, fold)  # the ViT: masks folded into the weights (as at full size) or pending
    (x0, y0), (x1, y1) = two_tasks(name)
    train_task(model, 0, x0, y0, sgd, epochs=2, batch=8)
    model.eval()
    with torch.no_grad():
        before = model(x0, task_id=0)
    state = copy.deepcopy(model.state_dict())
    train_task(model, 1, x1, y1, sgd, epochs=2, batch=8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x0, task_id=0), before), f"{name} forgot task 0"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    shared = [k for k in changed if k.endswith("weight") and ".copies." not in k]
    assert shared, "training task 1 changed no shared weight: the test would be trivially true"
    assert not [k for k in changed if ".copies.0." in k or k.endswith(".copies.0")], "task 0's own copies changed"


def test_vit_class_token_and_position_embedding_are_per_task():
    model = create_hat("hat_vit_tiny_patch16_224", num_tasks=2)
    for tokens in (model.cls_token, model.pos_embed):
        assert tokens.copies[0].data_ptr() != tokens.copies[1].data_ptr()
    torch.manual_seed(0)
    (x, y), _ = two_tasks("hat_vit_tiny_patch16_224")
    before = [p.detach().clone() for p in (*model.cls_token.copies, *model.pos_embed.copies)]
    train_task(model, 1, x, y, sgd, epochs=1, batch=8)
    after = [*model.cls_token.copies, *model.pos_embed.copies]
    assert torch.equal(after[0], before[0]) and torch.equal(after[3], before[3])  # task 0's copies
    assert not torch.equal(after[1], before[1]) and not torch.equal(after[4], before[4])  # task 1's


@pytest.mark.parametrize("known_inputs", [True, False])
@pytest.mark.parametrize("mask_scale", [None, 2.0, 400.0])
def test_vit_linear_with_the_mask_folded_into_the_weight_computes_what_hat_linear_computes(mask_scale, known_inputs):
    """The ViT's layers scale weight rows by the mask instead of the (tokens x units) output: same
    outputs, same gradients of weight, bias and mask embedding (Eq. 2 and 3), same ownership."""
    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=3, mask_init="normal")
    layers = [HATLinear(8, 6, cfg), HATTokenLinear(8, 6, cfg)]
    layers[1].load_state_dict(layers[0].state_dict())
    x, in_owned = torch.randn(4, 10, 8), (torch.rand(8) > 0.5).float() if known_inputs else None
    results = []
    for layer in layers:
        mark_task_trained(layer, 0)
        layer.train()
        with fixed_masks():  # mask_scale None: training with fixed (binary) masks, on purpose
            out = layer(HATPayload(x, task_id=1, mask_scale=mask_scale, mask_dim=2 if known_inputs else None,
                                   ownership=in_owned))
        (out.data * torch.arange(6.0)).sum().backward()
        emb_grad = layer.mask_embedding.grad
        results.append((out.data, layer.weight.grad, layer.bias.grad, emb_grad, out.ownership))
    assert results[1][0].abs().sum() > 0 and (results[1][1] == 0).any()  # Eq. 2 froze some weights
    for name, a, b in zip(("output", "weight grad", "bias grad", "embedding grad", "ownership"), *results):
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["hat_vit_tiny_patch16_224", "hat_alexnet"])
def test_forgetting_task_0_leaves_task_1_bit_identical(name):
    torch.manual_seed(0)
    chans, _, extra = SMALL[name]
    model = timm.create_model(name, hat_config=HATConfig(num_tasks=2, mask_init="normal"), num_classes=2,
                              in_chans=chans, **extra)
    fold_masks(model, True)
    (x0, y0), (x1, y1) = two_tasks(name)
    train_task(model, 0, x0, y0, sgd, epochs=2, batch=8)
    train_task(model, 1, x1, y1, sgd, epochs=2, batch=8)
    model.eval()
    with torch.no_grad():
        before = model(x1, task_id=1)
        assert sum(forget_task(model, 0).values()) > 0
        assert torch.equal(model(x1, task_id=1), before)
