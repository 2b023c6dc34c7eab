"""A new user's first hour: the first import is quiet and light; what this package downloads fails
offline with an error that says what was fetched from where and how to supply it."""
import re
import socket
import subprocess
import sys
import time

import pytest

IMPORT_CHECK = r"""
import sys, warnings
import avalanche_hat, avalanche_hat.modules, avalanche_hat.mechanism
heavy = [m for m in ("avalanche", "timm", "torchvision") if m in sys.modules]
assert not heavy, f"import avalanche_hat imported {heavy}"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from avalanche_hat import HAT
assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
assert "timm" not in sys.modules, "from avalanche_hat import HAT imported timm"
"""


def test_the_first_import_is_light_and_from_avalanche_hat_import_hat_emits_no_warning():
    subprocess.run([sys.executable, "-c", IMPORT_CHECK], check=True)


@pytest.fixture
def no_network(monkeypatch):
    """Every connection fails at once, as on a machine without internet (and retries do not wait)."""
    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


@pytest.mark.parametrize("name,num_classes,url,folder", [
    ("cifar10", 10, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py"),
    ("cifar100", 100, "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python"),
])
def test_the_bench_cifar_loader_offline_names_the_url_the_folder_and_what_to_do(no_network, tmp_path, name,
                                                                                num_classes, url, folder):
    from avalanche_hat.bench.data import DataNotFound, make_benchmark

    with pytest.raises(DataNotFound) as info:
        make_benchmark(name, data_root=tmp_path)
    message = str(info.value)
    assert url in message and str(tmp_path) in message and folder in message and "--data-root" in message
    assert isinstance(info.value.__cause__, OSError)  # the original failure, chained
    assert len(message.splitlines()) == 1


def test_the_bench_cifar_loader_names_avalanches_default_folder(no_network, monkeypatch, tmp_path):
    from avalanche.benchmarks.datasets import dataset_utils
    from avalanche.benchmarks.datasets.external_datasets import cifar

    from avalanche_hat.bench.data import DataNotFound, load_cifar

    for module in (dataset_utils, cifar):  # where Avalanche's getter would download to
        monkeypatch.setattr(module, "default_dataset_location", lambda name: tmp_path / "default" / name)
    with pytest.raises(DataNotFound, match=re.escape(str(tmp_path / "default" / "cifar10"))):
        load_cifar(10)


def test_pretrained_weights_offline_name_where_they_come_from_and_how_to_supply_them(no_network, tmp_path):
    import timm

    import avalanche_hat.timm_models  # noqa: F401
    from avalanche_hat import HATConfig
    from avalanche_hat.timm_models import PretrainedWeightsUnavailableError

    with pytest.raises(PretrainedWeightsUnavailableError) as info:
        timm.create_model("hat_resnet18", hat_config=HATConfig(num_tasks=2), pretrained=True,
                          cache_dir=str(tmp_path))  # an empty cache
    message = str(info.value)
    assert "https://huggingface.co/timm/resnet18" in message
    assert "pretrained_cfg_overlay=dict(file=" in message and "pretrained=False" in message
    assert isinstance(info.value.__cause__, OSError)
