"""Offline data and small HAT networks for the Avalanche tests.

- ``write_cifar10`` / ``write_cifar100``: tiny datasets in torchvision's exact on-disk format, so that
  Avalanche's real ``SplitCIFAR10`` / ``SplitCIFAR100`` run end to end; ``cifar_checksums`` gives the
  md5 tables torchvision checks (tests point torchvision at them with monkeypatch).
- ``write_fashion_mnist``: a class-balanced subsample of the real Fashion-MNIST (Debian package
  ``dataset-fashion-mnist``) in torchvision's raw format, for ``SplitFMNIST``.
- ``TinyHATNet``: a small convolutional HAT network that takes a ``HATPayload`` and returns features.
- ``tensor_benchmark``: an in-memory task-incremental benchmark for fast unit tests.

Module-level (not in a test file) so that checkpoints can pickle the network by reference and a
resumed run in another process can import it.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle

import numpy as np
import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload
from avalanche_hat.modules import HATConv2d, HATLinear, TaskIndexedBatchNorm2d

FMNIST_SOURCE = "/usr/share/datasets/fashion-mnist"


# ------------------------------------------------------------------------------------ CIFAR
def _palette(num_classes: int) -> np.ndarray:
    """Random RGB colours, pairwise far apart (rejection sampling): classes differ clearly."""
    rng = np.random.default_rng(1234)
    min_distance = 90.0 if num_classes <= 10 else 30.0
    colours = []
    while len(colours) < num_classes:
        c = rng.integers(30, 226, size=3)
        if all(np.linalg.norm(c - other) >= min_distance for other in colours):
            colours.append(c)
    return np.stack(colours)


def _colour_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """32x32 RGB images (N, 3072) whose class is a colour, with noise: learnable in a few steps and
    unchanged by random crops and flips."""
    palette = _palette(num_classes)
    images = palette[labels][:, :, None, None] + rng.normal(0, 25, size=(len(labels), 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(len(labels), 3 * 32 * 32)


def _dump(path: str, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: str, train_per_class: int = 20, test_per_class: int = 10, seed: int = 0) -> str:
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` as torchvision reads them."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    train_labels = rng.permutation(np.repeat(np.arange(10), train_per_class))
    for b, chunk in enumerate(np.array_split(train_labels, 5), start=1):
        _dump(os.path.join(folder, f"data_batch_{b}"), {
            "batch_label": f"training batch {b} of 5", "labels": chunk.tolist(),
            "data": _colour_images(chunk, 10, rng), "filenames": [f"img{b}_{i}.png" for i in range(len(chunk))],
        })
    test_labels = np.repeat(np.arange(10), test_per_class)
    _dump(os.path.join(folder, "test_batch"), {
        "batch_label": "testing batch 1 of 1", "labels": test_labels.tolist(),
        "data": _colour_images(test_labels, 10, rng), "filenames": [f"t{i}.png" for i in range(len(test_labels))],
    })
    _dump(os.path.join(folder, "batches.meta"), {
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "num_cases_per_batch": len(train_labels) // 5, "num_vis": 3072,
    })
    return root


def write_cifar100(root: str, train_per_class: int = 4, test_per_class: int = 2, seed: int = 0) -> str:
    """``root/cifar-100-python/{train, test, meta}`` as torchvision reads them."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        _dump(os.path.join(folder, name), {
            "filenames": [f"{name}{i}.png" for i in range(len(labels))], "batch_label": name,
            "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
            "data": _colour_images(labels, 100, rng),
        })
    _dump(os.path.join(folder, "meta"), {
        "fine_label_names": [f"class{i}" for i in range(100)],
        "coarse_label_names": [f"super{i}" for i in range(20)],
    })
    return root


def _md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def cifar_checksums(root: str) -> dict:
    """``{class: {attribute: value}}``: the md5 tables of torchvision's CIFAR classes for the files
    under ``root`` (apply with monkeypatch.setattr, or ``patch_cifar_checksums`` in a subprocess)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    tables = {}
    for cls in (CIFAR10, CIFAR100):
        folder = os.path.join(root, cls.base_folder)
        if not os.path.isdir(folder):
            continue
        tables[cls] = {
            "train_list": [[name, _md5(os.path.join(folder, name))] for name, _ in cls.train_list],
            "test_list": [[name, _md5(os.path.join(folder, name))] for name, _ in cls.test_list],
            "meta": {**cls.meta, "md5": _md5(os.path.join(folder, cls.meta["filename"]))},
        }
    return tables


def patch_cifar_checksums(root: str, monkeypatch=None) -> None:
    """Point torchvision's checksum tables at the files under ``root`` (for the whole process when
    no monkeypatch is given: only in throwaway subprocesses)."""
    for cls, attributes in cifar_checksums(root).items():
        for name, value in attributes.items():
            if monkeypatch is None:
                setattr(cls, name, value)
            else:
                monkeypatch.setattr(cls, name, value)


# ------------------------------------------------------------------------------ Fashion-MNIST
def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _write_idx(path: str, array: np.ndarray) -> None:
    magic = (0x08 << 8 | array.ndim).to_bytes(4, "big")  # unsigned bytes, ndim dimensions
    header = magic + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fashion_mnist(root: str, train_per_class: int = 60, test_per_class: int = 40) -> str:
    """The first ``n`` images of each class of the real Fashion-MNIST, in ``root/FashionMNIST/raw``."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        images = _read_idx(os.path.join(FMNIST_SOURCE, f"{split}-images-idx3-ubyte.gz"))
        labels = _read_idx(os.path.join(FMNIST_SOURCE, f"{split}-labels-idx1-ubyte.gz"))
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
        _write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images[keep])
        _write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels[keep])
    return root


def fashion_mnist_available() -> bool:
    return os.path.exists(os.path.join(FMNIST_SOURCE, "train-images-idx3-ubyte.gz"))


# ------------------------------------------------------------------------------------ networks
class TinyHATNet(nn.Module):
    """conv-bn-relu-pool twice, average pool to 2x2, a HAT fully connected layer: features.

    ``forward(payload) -> payload`` (HATMultiTaskModel adds the per-task heads)."""

    def __init__(self, hat_config: HATConfig, in_channels: int = 3, width: int = 8, num_features: int = 32):
        super().__init__()
        self.hat_config = hat_config
        self.num_features = num_features
        self.conv1 = HATConv2d(in_channels, width, 3, hat_config, padding=1)
        # momentum=None: running statistics are the plain average over the (few) training batches,
        # so that evaluation after a short training sees the statistics training saw.
        self.bn1 = TaskIndexedBatchNorm2d(width, hat_config, momentum=None)
        self.conv2 = HATConv2d(width, 2 * width, 3, hat_config, padding=1)
        self.bn2 = TaskIndexedBatchNorm2d(2 * width, hat_config, momentum=None)
        self.fc = HATLinear(2 * width * 4, num_features, hat_config)
        self.relu, self.pool, self.squeeze = nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2)

    def forward(self, p: HATPayload) -> HATPayload:
        p = self.bn1(self.conv1(p)).forward_by(self.relu).forward_by(self.pool)
        p = self.bn2(self.conv2(p)).forward_by(self.relu).forward_by(self.pool)
        p = p.forward_by(self.squeeze).flatten(1)
        return self.fc(p).forward_by(self.relu)


def tensor_benchmark(num_tasks: int = 3, classes_per_task: int = 2, per_class: int = 16, size: int = 8,
                     task_labels: bool = True, seed: int = 0):
    """An in-memory task-incremental benchmark (Avalanche's nc_benchmark) of colour-coded images."""
    from torch.utils.data import TensorDataset
    from avalanche.benchmarks import nc_benchmark

    g = torch.Generator().manual_seed(seed)
    num_classes = num_tasks * classes_per_task
    palette = torch.rand(num_classes, 3, 1, 1, generator=g) * 2 - 1

    def split(n):
        y = torch.arange(num_classes).repeat_interleave(n)
        x = palette[y] + 0.3 * torch.randn(len(y), 3, size, size, generator=g)
        ds = TensorDataset(x, y)
        ds.targets = y.tolist()
        return ds

    return nc_benchmark(
        split(per_class), split(per_class // 2), n_experiences=num_tasks, task_labels=task_labels,
        seed=seed, class_ids_from_zero_in_each_exp=task_labels,
    )


# ----------------------------------------------------------------------------- a whole stream
def exact_eval_metrics():
    """Accuracy per experience and stream, the accuracy matrix and BWT; no loggers."""
    from avalanche.evaluation.metrics import accuracy_matrix_metrics, accuracy_metrics, bwt_metrics
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), accuracy_matrix_metrics(),
        bwt_metrics(experience=True, stream=True), loggers=[],
    )


def run_split_cifar10(root: str, checkpoint: str | None = None, stop_after: int | None = None,
                      n_experiences: int = 5, epochs: int = 4) -> dict:
    """Train HAT on SplitCIFAR10 (task-incremental) from ``root``, evaluating the whole test stream
    after each experience; with ``checkpoint``, resume from it if it exists and save after each
    experience (Avalanche's own save_checkpoint / maybe_load_checkpoint); stop after experience
    index ``stop_after``. Returns the accuracy matrix as nested lists and a fingerprint of the
    model (the float64 sum of every tensor of its state). Deterministic: one thread, every
    generator seeded."""
    from avalanche.benchmarks.classic import SplitCIFAR10
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
    from avalanche.training.determinism.rng_manager import RNGManager

    from avalanche_hat import HAT

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        RNGManager.set_random_seeds(0)
        benchmark = SplitCIFAR10(n_experiences, return_task_id=True, seed=0,
                                 class_ids_from_zero_in_each_exp=True, dataset_root=root)
        net = TinyHATNet(HATConfig(num_tasks=n_experiences))
        strategy = HAT(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), num_classes=2,
                       train_mb_size=10, train_epochs=epochs, eval_mb_size=50, evaluator=exact_eval_metrics())
        start = 0
        if checkpoint is not None:
            strategy, start = maybe_load_checkpoint(strategy, checkpoint)
        for experience in benchmark.train_stream[start:]:
            strategy.train(experience)
            strategy.eval(benchmark.test_stream)
            if checkpoint is not None:
                save_checkpoint(strategy, checkpoint)
            if stop_after is not None and experience.current_experience == stop_after:
                break
        state = strategy.model.state_dict()
        return {
            "matrix": strategy.evaluator.get_last_metrics()["EvalStream/Acc_Matrix"].tolist(),
            "fingerprint": {k: v.double().sum().item() for k, v in state.items()},
        }
    finally:
        torch.set_num_threads(threads)
