"""Checkpoints survive a failure while saving, and a damaged file gets an error that says what to do.

A process killed inside Avalanche's ``save_checkpoint`` left a 0-byte file where the previous
checkpoint was (it opens the target first), and loading it failed with ``EOFError: Ran out of
input``. ``avalanche_hat.training.save_checkpoint`` writes a temporary file, fsyncs it and renames it.
"""
import os

import dill
import pytest
import torch

from avalanche_hat import HAT, HATConfig
from avalanche_hat.training import CheckpointError, maybe_load_checkpoint, save_checkpoint

from cifar_fixtures import TinyHATNet, exact_eval_metrics, tensor_benchmark

pytestmark = [pytest.mark.filterwarnings("ignore:No loggers specified"), pytest.mark.usefixtures("one_thread")]


def make_strategy():
    torch.manual_seed(0)
    net = TinyHATNet(HATConfig(num_tasks=2))
    return HAT(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), num_classes=2, train_mb_size=16,
               train_epochs=1, evaluator=exact_eval_metrics())


@pytest.fixture(scope="module")
def trained():
    """A strategy after its first experience."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    strategy = make_strategy()
    strategy.train(tensor_benchmark(2).train_stream[0])
    torch.set_num_threads(threads)
    return strategy


class Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing may catch it on the way)."""


def test_a_failure_while_saving_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    path = tmp_path / "hat.ckpt"
    save_checkpoint(trained, str(path))
    good = path.read_bytes()
    original_dump = dill.Pickler.dump

    def dump_then_die(self, obj):
        original_dump(self, obj)  # everything pickled, then the process dies while writing the file
        self.write(b"\x80" * 64)
        raise Killed()

    monkeypatch.setattr(dill.Pickler, "dump", dump_then_die)
    with pytest.raises(Killed):
        save_checkpoint(trained, str(path))
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["hat.ckpt"]  # no temporary file left behind
    fresh, start = maybe_load_checkpoint(make_strategy(), str(path))
    assert start == 1 and fresh.trained_tasks == [0]


def test_saving_replaces_the_checkpoint_and_keeps_its_name(trained, tmp_path):
    path = tmp_path / "hat.ckpt"
    path.write_bytes(b"an older checkpoint")
    save_checkpoint(trained, path)  # a PathLike works too
    assert os.listdir(tmp_path) == ["hat.ckpt"]
    fresh, start = maybe_load_checkpoint(make_strategy(), str(path))
    assert start == 1
    saved, loaded = trained.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_empty_or_truncated_checkpoint_gets_an_error_that_names_it_and_says_what_to_do(trained, tmp_path, damage):
    path = tmp_path / "hat.ckpt"
    save_checkpoint(trained, str(path))
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    what = "is empty" if damage == "empty" else "is truncated or damaged"
    with pytest.raises(CheckpointError, match=f"{path}.*{what}.*Delete it to start training over.*previous checkpoint"):
        maybe_load_checkpoint(make_strategy(), str(path))


def test_a_missing_checkpoint_still_means_start_from_the_first_experience(tmp_path):
    strategy = make_strategy()
    assert maybe_load_checkpoint(strategy, str(tmp_path / "none.ckpt")) == (strategy, 0)
