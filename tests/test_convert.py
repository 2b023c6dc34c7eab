"""convert() and export_task(): any timm / torchvision model as a HAT network, and one task back out.

The sweep trains task 0 of each converted model with the HAT regulariser and the cosine mask-scale
schedule, marks it, trains task 1, and requires task 0's outputs to be bit-identical while task 1
really moved weights. Models are the smallest variants (or smaller widths and depths) at 32x32.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from avalanche_hat import (ConversionError, HATConfig, convert, export_task, hat_regularization, mark_task_trained,
                           recorded_masks)
from avalanche_hat.mechanism import CosineMaskScale
from avalanche_hat.modules import HATModule, TaskIndexedModule
from avalanche_hat.network import hat_modules

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
C = 3  # classes per task


def _timm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, num_classes=C, **kw)


class PostNormMLP(nn.Module):
    """Linear followed directly by LayerNorm (a post-norm block): the norm's statistics run over the
    units, so it must see the masked data (folding the mask would let later tasks' units in)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3 * SIZE * SIZE, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 32)
        self.norm2 = nn.LayerNorm(32)
        self.head = nn.Linear(32, C)

    def forward(self, x):
        x = nn.functional.gelu(self.norm(self.fc1(x.flatten(1))))
        return self.head(nn.functional.gelu(self.norm2(self.fc2(x))))


SWEEP = {
    "resnet10t": _timm("resnet10t"),
    "resnext": lambda: timm.models.resnet.ResNet(timm.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=C,
                                                cardinality=4, base_width=4, stem_width=16),
    "regnetx_002": _timm("regnetx_002"),
    "mobilenetv3_small_050": _timm("mobilenetv3_small_050"),
    "efficientnet": lambda: timm.models.efficientnet._gen_efficientnet("efficientnet_b0", channel_multiplier=0.25,
                                                                       depth_multiplier=0.3, num_classes=C),
    "convnext_atto": _timm("convnext_atto", dims=(16, 32, 48, 64), depths=(1, 1, 2, 1)),
    "densenet": _timm("densenet121", growth_rate=8, block_config=(2, 2, 2, 2), stem_type="deep"),
    "vit_tiny": _timm("vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=2),
    "deit_tiny_distilled": _timm("deit_tiny_distilled_patch16_224", img_size=SIZE, patch_size=8, depth=2),
    "cait": _timm("cait_xxs24_224", img_size=SIZE, patch_size=8, depth=2, depth_token_only=1),
    "swin": _timm("swin_tiny_patch4_window7_224", img_size=SIZE, window_size=4, embed_dim=24, depths=(1, 1),
                  num_heads=(1, 2)),
    "mlp_mixer": lambda: timm.models.mlp_mixer.MlpMixer(num_classes=C, img_size=SIZE, patch_size=8, num_blocks=2,
                                                        embed_dim=64),
    "poolformerv2": lambda: timm.models.metaformer.MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                                                              num_classes=C),
    "convmixer": lambda: timm.models.convmixer.ConvMixer(dim=32, depth=2, num_classes=C),
    "mobilevit_xxs": _timm("mobilevit_xxs"),
    "post_norm_mlp": lambda: PostNormMLP(),
    "tv_resnet18": lambda: torchvision.models.resnet18(num_classes=C),
    "tv_mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=C),
}


def _step(net, t, x, y, s, opt):
    opt.zero_grad()
    with recorded_masks() as masks:
        out = net(x, task_id=t, mask_scale=s)
    loss = nn.functional.cross_entropy(out, y) + 0.75 * hat_regularization(net, t, s, recorded=masks)
    loss.backward()
    opt.step()


def _train(net, t, x, y, steps=2):
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    schedule = CosineMaskScale(net.hat_config.max_mask_scale)
    for i in range(steps):
        _step(net, t, x, y, schedule.at(i, steps + 1), opt)


def _hat_weights(net):
    return {n: l.weight.detach().clone() for n, l in hat_modules(net)}


@pytest.mark.parametrize("name", list(SWEEP))
def test_converted_model_keeps_the_original_and_task_0_bit_identical(name):
    torch.manual_seed(0)
    plain = SWEEP[name]().eval()
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.randint(0, C, (2,))
    net = convert(plain, HATConfig(num_tasks=2, mask_init="normal"))
    assert net.hat_report.hat_layers, "no HAT layer"
    net.eval()
    with torch.no_grad():  # task_id=None is the original network
        torch.testing.assert_close(net(x), plain(x), rtol=1e-5, atol=1e-6)
    _train(net, 0, x, y)
    mark_task_trained(net, 0)
    net.eval()
    with torch.no_grad():
        before = net(x, task_id=0)
    weights = _hat_weights(net)
    _train(net, 1, x, y)
    net.eval()
    with torch.no_grad():
        after = net(x, task_id=0)
    assert torch.equal(before, after), f"{name}: task 0 changed by {(before - after).abs().max().item():.3g}"
    moved = [n for n, w in _hat_weights(net).items() if not torch.equal(w, weights[n])]
    assert moved, f"{name}: training task 1 moved no HAT weight, the check above would be trivial"


def test_parts_become_hat_layers_norms_heads_and_per_task_tensors():
    plain = SWEEP["vit_tiny"]()
    net = convert(plain, HATConfig(num_tasks=3))
    report = net.hat_report
    hat = set(report.hat_layers)
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
            "blocks.0.mlp.fc2"} <= hat
    assert report.heads == ["head"]
    assert {"cls_token", "pos_embed"} <= set(report.per_task)
    text = str(report)
    assert "HATLinear" in text and "TaskIndexedParameter" in text and "TaskIndexedLayerNorm" in text
    # every trainable parameter belongs to a HAT layer or to a per-task module
    for name, p in net.named_parameters():
        if p.requires_grad:
            owner = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
            assert isinstance(owner, HATModule) or any(
                isinstance(net.get_submodule(".".join(name.split(".")[:k])), TaskIndexedModule)
                for k in range(1, name.count(".") + 1)), name


def test_heads_argument_sets_the_width_of_each_tasks_head_and_keeps_the_original_for_none():
    plain = torchvision.models.resnet18(num_classes=10).eval()
    net = convert(plain, HATConfig(num_tasks=2), heads=4).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert net(x, task_id=1).shape == (2, 4)
        torch.testing.assert_close(net(x), plain(x))
    assert net.num_classes == 4
    with pytest.raises(ConversionError, match="not a module"):
        convert(plain, HATConfig(num_tasks=2), heads="nope")


def test_a_mask_is_never_put_on_another_axis_and_dead_units_are_exact_zeros():
    """A unit switched off for a task is an exact 0 everywhere its layer's output is read."""
    plain = SWEEP["vit_tiny"]().eval()
    net = convert(plain, HATConfig(num_tasks=2)).eval()
    fc1 = net.model.blocks[0].mlp.fc1
    with torch.no_grad():
        fc1.mask_embedding[0, ::2] = -1.0  # every other hidden unit off for task 0
    seen = {}
    hook = net.model.blocks[0].mlp.fc2.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].data))
    with torch.no_grad():
        net(torch.randn(2, 3, SIZE, SIZE), task_id=0)
    hook.remove()
    assert torch.equal(seen["x"][..., ::2], torch.zeros_like(seen["x"][..., ::2]))
    assert bool((seen["x"][..., 1::2] != 0).any())


def test_untraceable_part_is_named_with_the_reason():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value
                return self.conv(x)
            return -self.conv(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 3, 1)
            self.block = Branchy()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.block(self.stem(x)).mean((2, 3)))

    with pytest.raises(ConversionError, match=r"module 'block' \(Branchy\)"):
        convert(Net(), HATConfig(num_tasks=2))
    net = convert(Net(), HATConfig(num_tasks=2), leaf_modules=(Branchy,))
    assert "block" in net.hat_report.per_task


def test_converted_network_survives_deepcopy_and_pickle():
    plain = SWEEP["resnet10t"]()
    net = convert(plain, HATConfig(num_tasks=2)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = net(x, task_id=1)
        assert torch.equal(copy.deepcopy(net)(x, task_id=1), ref)
        assert torch.equal(pickle.loads(pickle.dumps(net))(x, task_id=1), ref)


def _random_masks(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in hat_modules(net):
            layer.mask_embedding.copy_(torch.randn(layer.mask_embedding.shape, generator=g) + 0.3)


@pytest.mark.parametrize("name", ["tv_resnet18", "vit_tiny", "mobilenetv3_small_050", "densenet", "convnext_atto"])
def test_export_task_matches_the_task_and_is_pruned_and_plain(name):
    torch.manual_seed(0)
    plain = SWEEP[name]().eval()
    net = convert(plain, HATConfig(num_tasks=2)).eval()
    _random_masks(net)
    exported = export_task(net, 1)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x, task_id=1), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, (HATModule, TaskIndexedModule)) for m in exported.modules())
    assert exported.hat_export.pruned, "nothing was pruned"
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("name", ["tv_resnet18", "vit_tiny"])
def test_export_task_works_with_torch_export(name):
    torch.manual_seed(0)
    net = convert(SWEEP[name]().eval(), HATConfig(num_tasks=2)).eval()
    _random_masks(net, seed=1)
    exported = export_task(net, 0)
    x = torch.randn(2, 3, SIZE, SIZE)
    program = torch.export.export(exported, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), exported(x))


def test_hat_strategy_converts_a_plain_model_and_keeps_its_weights():
    from cifar_fixtures import exact_eval_metrics, tensor_benchmark

    from avalanche_hat import HAT

    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=5)
    original = copy.deepcopy(plain.state_dict())
    benchmark = tensor_benchmark(2, size=SIZE, per_class=4)
    strategy = HAT(model=plain, hat_config=HATConfig(num_tasks=2), num_classes=2,
                   optimizer=torch.optim.SGD(plain.parameters(), lr=0.01), train_mb_size=8, train_epochs=1,
                   eval_mb_size=16, evaluator=exact_eval_metrics())
    backbone = strategy.model.backbone
    assert torch.equal(backbone.model.conv1.weight, original["conv1.weight"])  # pretrained weights kept
    x = torch.stack([benchmark.test_stream[0].dataset[i][0] for i in range(4)])
    strategy.train(benchmark.train_stream[0])
    strategy.model.eval()
    with torch.no_grad():
        before = strategy.model(x, 0)
    strategy.train(benchmark.train_stream[1])
    strategy.model.eval()
    with torch.no_grad():
        assert torch.equal(strategy.model(x, 0), before)
    assert strategy.trained_tasks == [0, 1]
    with pytest.raises(ValueError, match="hat_config"):
        HAT(model=torchvision.models.resnet18(), optimizer=torch.optim.SGD(plain.parameters(), lr=0.1))
