"""timm's gradient checkpointing (``model.set_grad_checkpointing(True)``) on every registered HAT
network: a checkpointed training step is the same step (bit for bit: loss, every gradient, BatchNorm
statistics, the regulariser with the masks recorded in the forward), and training the next task with
it on still leaves a learned task's outputs bit-identical."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import avalanche_hat.timm_models  # noqa: F401  (registers the hat_* networks)
from avalanche_hat import HATConfig, hat_regularization, mark_task_trained, recorded_masks
from avalanche_hat.mechanism import fused
from avalanche_hat.timm_models import HAT_MODELS, HATNetwork
from avalanche_hat.timm_models.vit import HATTokenLinear

from nets import train_task
from test_timm_models import SMALL, one_thread, sgd, two_tasks  # noqa: F401  (one_thread: autouse fixture)

REGISTERED = sorted(timm.list_models("hat_*"))
# dropout and drop-path where the network has them: the recomputation must draw the same units
RANDOM = {
    "hat_vit_tiny_patch16_224": dict(drop_path_rate=0.2, proj_drop_rate=0.1),
    "hat_vit_small_patch16_224": dict(drop_path_rate=0.2),
    "hat_vit_base_patch16_224": dict(drop_path_rate=0.2),
    "hat_mlp": dict(drop_rate=0.3),
}


def test_every_registered_hat_network_is_covered():
    assert set(REGISTERED) == set(HAT_MODELS), "a new hat_* network needs a SMALL entry in test_timm_models.py"


def build(name, num_tasks=3, **kwargs):
    chans, _, extra = SMALL[name]
    return timm.create_model(name, hat_config=HATConfig(num_tasks=num_tasks, mask_init="normal"), num_classes=4,
                             in_chans=chans, **{**extra, **RANDOM.get(name, {}), **kwargs})


def batch(name, n=6):
    chans, size, _ = SMALL[name]
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, chans, size, size, generator=g), torch.arange(n) % 4


def segments(model):
    """The modules each checkpointed segment starts with: ViT and ResNet blocks, AlexNet and MLP layers."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    if hasattr(model, "layer1"):
        return [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    if hasattr(model, "hidden"):
        return list(model.hidden)
    return [model.conv1, model.conv2, model.conv3, model.fc1, model.fc2]


def training_step(model, x, y, recorded: bool, scale=3.0):
    """One step as the HATPlugin takes it: the forward inside ``recorded_masks()``, the regulariser on
    the recorded masks (or computing its own), the backward after the block."""
    model.train()
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in segments(model)]
    torch.manual_seed(5)  # the same dropout draws for both runs
    with recorded_masks() as masks:
        out = model(x, task_id=1, mask_scale=scale)
    loss = F.cross_entropy(out, y) + 0.5 * hat_regularization(model, 1, scale, recorded=masks if recorded else None)
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {k: p.grad for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return loss.detach(), grads, buffers, len(calls)


def check_same_step(model, x, y, recorded):
    plain, checkpointed = copy.deepcopy(model), copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    loss0, grads0, buffers0, calls0 = training_step(plain, x, y, recorded)
    loss1, grads1, buffers1, calls1 = training_step(checkpointed, x, y, recorded)
    n = len(segments(model))
    assert calls0 == n and calls1 == 2 * n, "every segment is recomputed once in the backward"
    assert torch.equal(loss1, loss0)
    nonzero = [k for k, g in grads0.items() if g is not None and bool(g.abs().sum() > 0)]
    assert len(nonzero) > n and any(k.endswith("mask_embedding") for k in nonzero)  # not a vacuous comparison
    for k, g in grads0.items():
        if g is None:
            assert grads1[k] is None, k
        else:
            assert torch.equal(grads1[k], g), f"gradient of {k} differs"
    for k, b in buffers0.items():  # BatchNorm statistics updated once, not twice
        assert torch.equal(buffers1[k], b), f"buffer {k} differs"


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-masks", "own-masks"])
@pytest.mark.parametrize("name", REGISTERED)
def test_a_checkpointed_step_is_the_same_step(name, recorded):
    """Bit-identical, not just close: the recomputation runs the same operations on the same inputs
    with the same random state, and the backward multiplies the same saved tensors."""
    torch.manual_seed(0)
    model = build(name)
    mark_task_trained(model, 0)  # Eq. 2 freezes task 0's units: the nullified gradients are compared too
    x, y = batch(name)
    check_same_step(model, x, y, recorded)


@pytest.mark.parametrize("name", ["hat_vit_tiny_patch16_224", "hat_resnet18s"])
def test_a_checkpointed_step_is_the_same_step_without_fused_kernels(name):
    torch.manual_seed(0)
    model = build(name)
    mark_task_trained(model, 0)
    x, y = batch(name)
    with fused.disabled():
        check_same_step(model, x, y, recorded=True)


def test_a_checkpointed_step_is_the_same_step_with_vit_masks_folded_into_the_weights():
    torch.manual_seed(0)
    model = build("hat_vit_tiny_patch16_224")
    for m in model.modules():
        if isinstance(m, HATTokenLinear):
            m.fold_mask = True  # the ViT-size path (_MaskFoldedLinear), which small inputs do not take
    mark_task_trained(model, 0)
    x, y = batch("hat_vit_tiny_patch16_224")
    check_same_step(model, x, y, recorded=True)


@pytest.mark.parametrize("name", REGISTERED)
def test_training_the_next_task_with_checkpointing_keeps_task_0_bit_identical(name):
    torch.manual_seed(0)
    chans, _, extra = SMALL[name]
    model = timm.create_model(name, hat_config=HATConfig(num_tasks=2, mask_init="normal"), num_classes=2,
                              in_chans=chans, **extra)
    model.set_grad_checkpointing(True)
    (x0, y0), (x1, y1) = two_tasks(name)
    train_task(model, 0, x0, y0, sgd, epochs=2, batch=8)
    model.eval()
    with torch.no_grad():
        before = model(x0, task_id=0)
    state = copy.deepcopy(model.state_dict())
    train_task(model, 1, x1, y1, sgd, epochs=2, batch=8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x0, task_id=0), before), f"{name} forgot task 0 with gradient checkpointing"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert [k for k in changed if k.endswith("weight") and ".copies." not in k], "task 1 changed no shared weight"


def test_inference_and_no_grad_forwards_are_not_checkpointed():
    model = build("hat_resnet18s").eval()
    model.set_grad_checkpointing(True)
    x, _ = batch("hat_resnet18s")
    calls = []
    hook = model.layer1[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = model(x, task_id=0)
    hook.remove()
    assert out.grad_fn is None and len(calls) == 1
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        assert torch.equal(model(x, task_id=0), out)


def test_a_network_that_cannot_checkpoint_refuses_clearly():
    class Custom(HATNetwork):  # a user's network that does not route its blocks through _segment
        pass

    with pytest.raises(NotImplementedError, match="does not support gradient checkpointing.*_segment"):
        Custom().set_grad_checkpointing(True)
    Custom().set_grad_checkpointing(False)  # switching it off is always fine
    with pytest.raises(TypeError, match="True or False"):
        build("hat_mlp").set_grad_checkpointing("yes")
