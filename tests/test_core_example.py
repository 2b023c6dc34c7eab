"""The core example (examples/core_api.py, shown in docs/getting-started.md): it learns, and its
guarantee is not trivial; a HAT layer as a network's output layer, which cannot learn, is refused
with what to do."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload, check_network_output, fixed_masks, hat_regularization, recorded_masks
from avalanche_hat.modules import HATLinear, TaskIndexedLinear

ROOT = Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("core_api_example", ROOT / "examples" / "core_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_core_example_learns_both_tasks_and_keeps_task_0_bit_identical(one_thread):
    acc0, acc1, unchanged = load_example().main(epochs=4)  # main asserts it too; checked here as well
    assert acc0 >= 0.9 and acc1 >= 0.9  # chance is 0.5
    assert unchanged


def test_getting_started_shows_the_example_code_as_it_runs():
    """The docs' core section (getting started) is the example's network and loop, word for word
    (no drift)."""
    page = (ROOT / "docs" / "getting-started.md").read_text()
    section = page.split("## The HAT core, without Avalanche or timm", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    source = (ROOT / "examples" / "core_api.py").read_text()
    core = source.split("# --8<-- [start:core]\n", 1)[1].split("# --8<-- [end:core]", 1)[0]
    assert core.strip() in block, "docs/getting-started.md's core example differs from examples/core_api.py"
    assert "model = Net(" in block and "train_task(model" in block  # and says what `model` is


def test_readme_core_snippet_runs_and_keeps_task_0_bit_identical(monkeypatch, one_thread):
    """README's short core snippet runs as printed, marks both tasks trained, and task 0's outputs
    after task 1 are those it had when it was marked (recorded by wrapping mark_task_trained)."""
    import avalanche_hat

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The core API, without Avalanche", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    probe, seen = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)), {}
    marked = avalanche_hat.mark_task_trained

    def recording(model, t):
        marked(model, t)
        model.eval()
        with torch.no_grad():
            seen[t] = model(probe, task_id=t)
        model.train()

    monkeypatch.setattr(avalanche_hat, "mark_task_trained", recording)
    torch.manual_seed(0)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert avalanche_hat.trained_tasks(model) == [0, 1] and set(seen) == {0, 1}
    with torch.no_grad():
        assert torch.equal(model(probe, task_id=0), seen[0]), "task 0 changed when task 1 was learned"
        assert not torch.equal(seen[0], seen[1])  # two tasks, two networks
    assert namespace["logits"].shape == (320, 2)


class HATOutputNet(nn.Module):
    """The old README example's shape: a HAT layer as the classifier (its 2 units get masked off)."""

    def __init__(self, cfg, head=None):
        super().__init__()
        self.fc1 = HATLinear(8, 16, cfg)
        self.out = head if head is not None else HATLinear(16, 2, cfg)

    def forward(self, x, t, s=None):
        p = self.fc1(HATPayload(x, task_id=t, mask_scale=s)).forward_by(nn.ReLU())
        out = self.out(p)
        return out.data if isinstance(out, HATPayload) else out


@pytest.mark.parametrize("scale", [10.0, None])
def test_a_hat_output_layer_is_refused_with_what_to_do(scale):
    net = HATOutputNet(HATConfig(num_tasks=2))
    with recorded_masks(), fixed_masks():  # scale None: training with fixed masks, on purpose
        out = net(torch.randn(4, 8), 0, scale)
    with pytest.raises(ValueError, match="output is the masked output of a HAT layer.*TaskIndexedLinear"):
        check_network_output(out)
    with fixed_masks():
        payload = net.out(HATPayload(torch.randn(4, 16), task_id=0, mask_scale=scale))
    with pytest.raises(ValueError, match="TaskIndexedLinear"):
        check_network_output(payload)  # a payload returned as it is


class PlainHeadNet(nn.Module):
    """HAT features, then one plain nn.Linear head shared by all tasks (unmasked: accepted)."""

    def __init__(self, cfg):
        super().__init__()
        self.fc1, self.out = HATLinear(8, 16, cfg), nn.Linear(16, 2)

    def forward(self, x, t, s=None):
        return self.out(self.fc1(HATPayload(x, task_id=t, mask_scale=s)).forward_by(nn.ReLU()).data)


def test_per_task_heads_and_plain_heads_are_accepted():
    cfg = HATConfig(num_tasks=2)
    for net in (HATOutputNet(cfg, head=TaskIndexedLinear(16, 2, cfg)), PlainHeadNet(cfg)):
        out = net(torch.randn(4, 8), 0, 10.0)
        check_network_output(out)  # no error
        out.sum().backward()


def test_the_hat_strategy_refuses_a_hat_output_layer_before_training_it():
    from avalanche.models import MultiTaskModule

    from avalanche_hat import HAT
    from cifar_fixtures import tensor_benchmark

    class OwnModel(MultiTaskModule):
        def __init__(self):
            super().__init__()
            self.mask_scale = None
            cfg = HATConfig(num_tasks=3)
            self.fc1, self.out = HATLinear(3 * 8 * 8, 16, cfg), HATLinear(16, 2, cfg)

        def forward_single_task(self, x, task_label):
            scale = self.mask_scale if self.training else None
            p = self.fc1(HATPayload(x.flatten(1), task_id=int(task_label), mask_scale=scale)).forward_by(nn.ReLU())
            return self.out(p).data

    torch.manual_seed(0)
    model = OwnModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = HAT(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), train_mb_size=8,
                   train_epochs=1, evaluator=None)
    with pytest.raises(ValueError, match="masked output of a HAT layer"):
        strategy.train(tensor_benchmark(3).train_stream[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any step
