"""The HAT strategy of Avalanche on Split Fashion-MNIST: every earlier task keeps its exact accuracy.

Avalanche's own ``SplitFMNIST`` benchmark (5 tasks of 2 classes, task labels given) reads Debian's
copy of Fashion-MNIST (``apt-get install dataset-fashion-mnist``: the four ``.gz`` files under
``/usr/share/datasets/fashion-mnist``), which this script decompresses into the folder layout
torchvision expects (``ROOT/FashionMNIST/raw``). ``HAT`` trains the timm network ``hat_mlp``
(784-400-400) with one 2-way head per task, and Avalanche's metrics report the accuracy matrix.
The script checks, and prints, that

- every task is learned (accuracy right after training it),
- the last row of the accuracy matrix equals its diagonal exactly: BWT = 0.0, not approximately,
- task 0's logits on its test images are bit-identical (``torch.equal``) after all five tasks.

Run: ``python examples/avalanche_split_fmnist.py`` (the whole data set, 3 epochs per task: a few
minutes on a CPU). ``AVALANCHE_HAT_EXAMPLES_FAST=1``: 200 training and 50 test images per class.
"""
import gzip
import os
import struct
import sys
import tempfile
import warnings

import numpy as np
import timm
import torch
from avalanche.benchmarks.classic import SplitFMNIST
from avalanche.evaluation.metrics import accuracy_matrix_metrics, accuracy_metrics, bwt_metrics
from avalanche.training.plugins import EvaluationPlugin

import avalanche_hat.timm_models  # noqa: F401  (registers hat_mlp and the other HAT networks)
from avalanche_hat import HAT, HATConfig

FAST = os.environ.get("AVALANCHE_HAT_EXAMPLES_FAST") == "1"
DEBIAN = "/usr/share/datasets/fashion-mnist"
TRAIN_PER_CLASS, TEST_PER_CLASS = (200, 50) if FAST else (None, None)  # None: every image
EPOCHS = 2 if FAST else 3


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_idx(path, array):
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array).tobytes())


def fashion_mnist_root(folder, train_per_class, test_per_class):
    """Debian's files, decompressed (optionally the first n images per class) into folder/FashionMNIST/raw."""
    if not os.path.exists(os.path.join(DEBIAN, "train-images-idx3-ubyte.gz")):
        sys.exit(f"Fashion-MNIST not found in {DEBIAN}: apt-get install dataset-fashion-mnist")
    raw = os.path.join(folder, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        images = read_idx(os.path.join(DEBIAN, f"{split}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(DEBIAN, f"{split}-labels-idx1-ubyte.gz"))
        if per_class is not None:
            keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
            images, labels = images[keep], labels[keep]
        write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels)
    return folder


def main():
    warnings.filterwarnings("ignore", message="No loggers specified")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = fashion_mnist_root(folder, TRAIN_PER_CLASS, TEST_PER_CLASS)
        # Class order 0-9: T-shirt/Trouser, Pullover/Dress, Coat/Sandal, Shirt/Sneaker, Bag/Ankle boot.
        benchmark = SplitFMNIST(5, return_task_id=True, fixed_class_order=list(range(10)),
                                class_ids_from_zero_in_each_exp=True, dataset_root=root)
        net = timm.create_model("hat_mlp", hat_config=HATConfig(num_tasks=5), num_classes=0)
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), accuracy_matrix_metrics(),
                                     bwt_metrics(stream=True), loggers=[])
        strategy = HAT(model=net, num_classes=2, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
                       train_mb_size=64, train_epochs=EPOCHS, eval_mb_size=500, evaluator=evaluator)

        test0 = benchmark.test_stream[0].dataset.eval()
        x0 = torch.stack([test0[i][0] for i in range(len(test0))])
        for experience in benchmark.train_stream:
            strategy.train(experience)
            results = strategy.eval(benchmark.test_stream)
            if experience.current_experience == 0:
                strategy.model.eval()
                with torch.no_grad():
                    logits0 = strategy.model(x0, 0)
            accs = [results[f"Top1_Acc_Exp/eval_phase/test_stream/Task{t:03d}/Exp{t:03d}"]
                    for t in range(experience.current_experience + 1)]
            print(f"after task {experience.current_experience}: test accuracy "
                  + " ".join(f"{a:.4f}" for a in accs))

    matrix = results["EvalStream/Acc_Matrix"]
    bwt = results["StreamBWT/eval_phase/test_stream"]
    print(f"mean final accuracy {matrix[-1].mean().item():.4f}, BWT {bwt}")
    for t in range(5):
        assert matrix[t, t] >= 0.8, f"task {t} was not learned: accuracy {matrix[t, t]:.4f}"
        assert matrix[4, t].item() == matrix[t, t].item(), f"task {t} changed: {matrix.tolist()}"
    assert bwt == 0.0, bwt
    strategy.model.eval()
    with torch.no_grad():
        assert torch.equal(strategy.model(x0, 0), logits0), "task 0's logits changed"
    print("OK: every earlier task kept its exact accuracy (BWT = 0.0) and task 0's logits are bit-identical")


if __name__ == "__main__":
    main()
