"""Task-incremental benchmarks with their images preloaded as normalised tensors.

Every benchmark is built by Avalanche's ``nc_benchmark`` (the generator behind ``SplitFMNIST``,
``SplitCIFAR10`` and ``SplitCIFAR100``) with the same arguments those classic benchmarks use, plus a
fixed class order, one task label per experience and class ids from 0 in each experience (so every
task has a 2-way, or 10-/5-way, head). The images are decoded once into one float tensor: no
per-sample PIL transform runs during training, so the CPU goes to the networks, not to loading.

- ``fmnist``: real Fashion-MNIST read from its four IDX files: ``--data-root``, Debian's
  ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``) or torchvision's layout
  under Avalanche's default data folder. 5 tasks of 2 classes.
- ``pfmnist``: Permuted Fashion-MNIST (as Avalanche's ``PermutedMNIST``): every task is the whole
  10-class data set under one fixed random pixel permutation (drawn from ``data_seed``; task 0 is
  permuted too), one 10-way head per task, task labels given. Built by ``nc_benchmark`` with one
  data set per experience on tensors permuted once (no per-sample transform). ``num_tasks`` sets
  the length of the sequence (10 by default); ``train_per_task`` / ``test_per_task`` draw a
  stratified subset of the training / evaluation images, the same images in every task.
- ``digits``: scikit-learn's 8x8 digits (ships with scikit-learn, 1797 images), split 80/20 with a
  fixed seed. 5 tasks of 2 classes. For tiny runs and CI.
- ``cifar10`` (5 tasks), ``cifar100`` (10 tasks), ``cifar100-20`` (20 tasks): fetched by
  Avalanche's own dataset getters (torchvision download to ``--data-root`` or Avalanche's default
  folder), then preloaded.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
# Channel statistics of the training sets (the usual published values).
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

from .options import BENCHMARKS, SCENARIOS, TASKS  # noqa: F401  (re-exported)


class DataNotFound(FileNotFoundError):
    """A data set that cannot be downloaded here is not on disk."""


class PreloadedImages(Dataset):
    """Images as one float tensor plus integer targets (what ``nc_benchmark`` needs: ``.targets``)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = [int(t) for t in targets.tolist()]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


@dataclass
class BenchmarkSpec:
    """What was built, in words and numbers, for the report."""

    name: str
    scenario: object  # avalanche NCScenario
    num_tasks: int
    classes_per_task: int
    in_chans: int
    img_size: int
    train_size: int
    test_size: int
    evaluation_set: str  # "test" or "holdout (10% of training data)"
    source: str
    class_order: list[int] = field(default_factory=list)
    load_seconds: float = 0.0
    scenario_kind: str = "task"  # "task"- or "class"-incremental
    per_task_images: bool = False  # pfmnist: train_size / test_size count the images of one task

    def describe(self) -> dict:
        sizes = {"images_per_task": True} if self.per_task_images else {}
        return {
            "benchmark": self.name, "num_tasks": self.num_tasks, "classes_per_task": self.classes_per_task,
            "input": [self.in_chans, self.img_size, self.img_size], "train_size": self.train_size,
            "eval_size": self.test_size, "evaluation_set": self.evaluation_set, "source": self.source,
            "class_order": self.class_order, "load_seconds": round(self.load_seconds, 2),
            "scenario": f"{self.scenario_kind}-incremental", **sizes,
        }


# ------------------------------------------------------------------------------------ raw loaders
def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned bytes
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def fmnist_folders(data_root: str | os.PathLike | None) -> list[Path]:
    """Where Fashion-MNIST's IDX files are looked for, in order: ``data_root`` (and its torchvision
    and Debian-style subfolders) alone when it is given, else Debian's package and Avalanche's
    default data folder."""
    if data_root is not None:
        root = Path(data_root).expanduser()
        return [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    avalanche_default = Path(os.environ.get("AVALANCHE_DATA", "~/.avalanche/data")).expanduser() / "fashionmnist"
    return [DEBIAN_FMNIST, avalanche_default / "FashionMNIST" / "raw"]


def load_fmnist(data_root=None) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], str]:
    """Fashion-MNIST as ``(train_x, train_y), (test_x, test_y), folder``; images ``N x 1 x 28 x 28``,
    normalised with the training set's mean and std. A ``data_root`` without the files is an error
    (never a silent fall-back to another copy)."""
    for folder in fmnist_folders(data_root):
        paths = {k: _find_idx(folder, stem) for k, stem in FMNIST_FILES.items()}
        if all(paths.values()):
            break
    else:
        looked = "\n  ".join(str(f) for f in fmnist_folders(data_root))
        files = ", ".join(f"{stem}(.gz)" for stem in FMNIST_FILES.values())
        if data_root is not None:
            state = "does not exist" if not Path(data_root).expanduser().exists() else "holds no Fashion-MNIST"
            raise DataNotFound(
                f"--data-root {data_root} {state}. Looked for the four IDX files {files} in:\n  {looked}\n"
                "Point --data-root at the folder holding them (or at torchvision's root with FashionMNIST/raw), "
                "or leave it out to use Debian's package (/usr/share/datasets/fashion-mnist)."
            )
        raise DataNotFound(
            f"Fashion-MNIST not found. Looked for the four IDX files {files} in:\n  {looked}\n"
            "Install Debian's package (sudo apt-get install dataset-fashion-mnist) "
            "or pass --data-root FOLDER with the four files (or torchvision's FashionMNIST/raw layout); "
            "--benchmark digits needs no download."
        )

    def images(key):
        x = torch.from_numpy(_read_idx(paths[key]).copy()).float().div_(255.0).unsqueeze(1)
        return x.sub_(FMNIST_MEAN[0]).div_(FMNIST_STD[0])

    def labels(key):
        return torch.from_numpy(_read_idx(paths[key]).astype(np.int64))

    return (images("train_images"), labels("train_labels")), (images("test_images"), labels("test_labels")), str(folder)


def load_digits(seed: int = 0):
    """scikit-learn's digits: ``N x 1 x 8 x 8`` images in [0, 16] scaled to mean 0 / std 1 on the
    training split; 80/20 stratified split with a fixed seed (independent of the run's seed)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=data.target)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return (x[tr], y[tr]), (x[te], y[te]), "sklearn.datasets.load_digits"


def _torchvision_to_tensor(dataset, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision CIFAR data set (``.data`` uint8 N x 32 x 32 x 3) as normalised tensors, in one
    vectorised pass (no PIL)."""
    x = torch.from_numpy(np.asarray(dataset.data)).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x.contiguous(), torch.tensor(dataset.targets, dtype=torch.int64)


def load_cifar(num_classes: int, data_root=None):
    """CIFAR-10/100 through Avalanche's getters (torchvision; downloads on first use). Raises
    :class:`DataNotFound` naming the URL, the folder and how to supply the data offline."""
    from avalanche.benchmarks.datasets.dataset_utils import default_dataset_location
    from avalanche.benchmarks.datasets.external_datasets.cifar import get_cifar10_dataset, get_cifar100_dataset
    from torchvision.datasets import CIFAR10, CIFAR100

    getter, mean, std, dataset = ((get_cifar10_dataset, CIFAR10_MEAN, CIFAR10_STD, CIFAR10) if num_classes == 10
                                  else (get_cifar100_dataset, CIFAR100_MEAN, CIFAR100_STD, CIFAR100))
    try:
        train, test = getter(data_root)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError
        name = "CIFAR-10" if num_classes == 10 else "CIFAR-100"
        where = Path(data_root) if data_root is not None else default_dataset_location(f"cifar{num_classes}")
        reason = (str(err).strip().splitlines() or ["no message"])[0][:200]
        raise DataNotFound(
            f"{name} is not in {where} and could not be downloaded from {dataset.url} "
            f"({type(err).__name__}: {reason}). Offline: on a machine with internet download "
            f"{dataset.filename} from that URL, put it (or the {dataset.base_folder}/ folder it "
            f"unpacks to) in a folder here and pass --data-root FOLDER (dataset_root=FOLDER for Avalanche's "
            f"Split{name.replace('-', '')})."
        ) from err
    return _torchvision_to_tensor(train, mean, std), _torchvision_to_tensor(test, mean, std), str(train.root)


# ------------------------------------------------------------------------------ benchmark builder
def stratified_holdout(targets: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(keep, holdout)``: ``fraction`` of every class held out, chosen with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for c in torch.unique(targets).tolist():
        idx = (targets == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


def stratified_subset(targets: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of ``fraction`` of every class (a documented training subset)."""
    if fraction >= 1.0:
        return torch.arange(len(targets))
    _, subset = stratified_holdout(targets, fraction, seed)
    return subset


def split_benchmark(train, test, num_tasks: int, class_order: list[int], scenario: str = "task"):
    """Avalanche's split of preloaded tensors (the arguments of SplitFMNIST / SplitCIFAR with a fixed
    class order): ``scenario="task"`` as ``return_task_id=True`` (class ids from 0 in each
    experience), ``"class"`` as ``return_task_id=False`` (task label 0 everywhere, global class ids)."""
    from avalanche.benchmarks import nc_benchmark

    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
    task = scenario == "task"
    return nc_benchmark(
        train_dataset=PreloadedImages(*train),
        test_dataset=PreloadedImages(*test),
        n_experiences=num_tasks,
        task_labels=task,
        fixed_class_order=class_order,
        class_ids_from_zero_in_each_exp=task,
    )


def pixel_permutations(num_tasks: int, num_pixels: int, seed: int) -> list[torch.Tensor]:
    """One fixed random permutation of the pixels per task, drawn in order from ``seed`` (task ``t``'s
    permutation does not depend on how many tasks follow)."""
    rng = np.random.RandomState(seed)
    return [torch.from_numpy(rng.permutation(num_pixels)).long() for _ in range(num_tasks)]


def permuted_benchmark(train, test, num_tasks: int, seed: int):
    """Avalanche's permuted benchmark on preloaded tensors: ``nc_benchmark`` with one data set per
    experience (what ``PermutedMNIST`` builds), task labels, class ids from 0 in each experience.
    Each task's images are permuted once here, not per sample."""
    from avalanche.benchmarks import nc_benchmark

    shape = train[0].shape[1:]
    perms = pixel_permutations(num_tasks, int(np.prod(shape)), seed)

    def permuted(x, perm):
        return x.flatten(1)[:, perm].reshape(len(x), *shape).contiguous()

    trains = [PreloadedImages(permuted(train[0], p), train[1]) for p in perms]
    tests = [PreloadedImages(permuted(test[0], p), test[1]) for p in perms]
    return nc_benchmark(trains, tests, n_experiences=num_tasks, task_labels=True, shuffle=False,
                        class_ids_from_zero_in_each_exp=True, one_dataset_per_exp=True)


def _stratified_count(targets: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Indices of about ``count`` images, the same share of every class."""
    if count >= len(targets):
        return torch.arange(len(targets))
    return stratified_subset(targets, count / len(targets), seed)


def make_benchmark(
    name: str = "fmnist",
    *,
    data_root=None,
    holdout: float | None = None,
    train_fraction: float = 1.0,
    data_seed: int = 0,
    scenario: str = "task",
    num_tasks: int | None = None,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
) -> BenchmarkSpec:
    """Build benchmark ``name``, task- or class-incremental (``scenario``, see :data:`SCENARIOS`).

    Args:
        holdout: if set (e.g. 0.1), that share of every class of the *training* data becomes the
            evaluation set and the test set is not touched (hyper-parameter selection).
        train_fraction: train on this stratified share of the training data (1.0: all of it).
        data_seed: seed of the holdout and subset draws and of pfmnist's permutations (the class
            order is fixed).
        num_tasks, train_per_task, test_per_task: ``pfmnist`` only: the number of permutations and
            the stratified number of training / evaluation images of each task (None: all).
    """
    import time

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: choose one of {', '.join(BENCHMARKS)}")
    if name != "pfmnist" and (num_tasks is not None or train_per_task or test_per_task):
        raise ValueError("num_tasks, train_per_task and test_per_task apply to the pfmnist benchmark only "
                         f"({name} has {TASKS[name]} fixed tasks): use train_fraction")
    if name == "pfmnist" and scenario != "task":
        raise ValueError("pfmnist is task-incremental: every task has the same 10 classes (scenario='task')")
    start = time.perf_counter()
    if name in ("fmnist", "pfmnist"):
        train, test, source = load_fmnist(data_root)
        in_chans, img = 1, 28
    elif name == "digits":
        if data_root is not None:
            raise DataNotFound(f"--data-root {data_root}: the digits benchmark ships with scikit-learn and reads "
                               "no folder; leave --data-root out")
        train, test, source = load_digits()
        in_chans, img = 1, 8
    else:
        train, test, source = load_cifar(10 if name == "cifar10" else 100, data_root)
        in_chans, img = 3, 32
    num_classes = int(train[1].max()) + 1
    num_tasks = num_tasks or TASKS[name]
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
    evaluation = "test"
    if holdout:
        keep, held = stratified_holdout(train[1], holdout, data_seed)
        test = (train[0][held], train[1][held])
        train = (train[0][keep], train[1][keep])
        evaluation = f"holdout ({100 * holdout:g}% of the training data)"
    if train_fraction < 1.0:
        sub = stratified_subset(train[1], train_fraction, data_seed + 1)
        train = (train[0][sub], train[1][sub])
    class_order = list(range(num_classes))
    if name == "pfmnist":
        if train_per_task:
            sub = _stratified_count(train[1], train_per_task, data_seed + 2)
            train = (train[0][sub], train[1][sub])
        if test_per_task:
            sub = _stratified_count(test[1], test_per_task, data_seed + 3)
            test = (test[0][sub], test[1][sub])
        benchmark = permuted_benchmark(train, test, num_tasks, data_seed)
        classes_per_task = num_classes
        source += f" (pixels permuted per task, permutations from seed {data_seed})"
    else:
        benchmark = split_benchmark(train, test, num_tasks, class_order, scenario)
        classes_per_task = num_classes // num_tasks
    return BenchmarkSpec(
        name=name, scenario=benchmark, num_tasks=num_tasks, classes_per_task=classes_per_task,
        in_chans=in_chans, img_size=img, train_size=len(train[1]), test_size=len(test[1]),
        evaluation_set=evaluation, source=source, class_order=class_order,
        load_seconds=time.perf_counter() - start, scenario_kind=scenario, per_task_images=name == "pfmnist",
    )


def loading_seconds(scenario, batch_size: int) -> float:
    """Seconds for one pass over every training experience through the same kind of loader the
    strategies use (Avalanche data set, shuffled ``DataLoader``, no model): the data-loading cost
    of one epoch on every task, to compare with the training time."""
    import time

    from torch.utils.data import DataLoader

    start = time.perf_counter()
    for exp in scenario.train_stream:
        for _ in DataLoader(exp.dataset, batch_size=batch_size, shuffle=True):
            pass
    return time.perf_counter() - start
