"""The leaderboard command, end to end on a tiny configuration, and the pieces it relies on."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# No importorskip: avalanche-lib brings matplotlib, scikit-learn, psutil and tqdm, and a missing one
# must fail here (CI has to catch a broken benchmark command, not skip it).
from avalanche_hat.bench import cli
from avalanche_hat.bench.data import DataNotFound, load_fmnist, make_benchmark
from avalanche_hat.bench.runner import MethodResult
from avalanche_hat.bench.strategies import METHODS, resolve_methods

TINY = ["--benchmark", "digits", "--epochs", "2", "--seeds", "0", "1", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def leaderboard(tmp_path_factory):
    """All 9 methods on digits, 2 seeds, through ``main`` (what the console script calls)."""
    out = tmp_path_factory.mktemp("leaderboard")
    assert cli.main([*TINY, "--out", str(out)]) == 0
    return out, json.loads((out / "digits.json").read_text())


def test_every_method_runs_and_is_reported(leaderboard):
    out, data = leaderboard
    assert [row["method"] for row in data["leaderboard"]] != []
    assert sorted(row["method"] for row in data["leaderboard"]) == sorted(METHODS)
    for row in data["leaderboard"]:
        assert row["seeds"] == [0, 1]
        assert 0.5 < row["acc_mean"] <= 1.0, row  # better than chance on 2-class tasks
        assert row["parameters"] > 0 and row["train_seconds_mean"] > 0
    assert len(data["runs"]) == 2 * len(METHODS)
    assert data["environment"]["avalanche_hat"]
    assert data["config"]["command"].startswith("avalanche-hat-bench")
    assert data["config"]["settings"]["epochs"] == 2


def test_outputs_are_written(leaderboard):
    out, _ = leaderboard
    md = (out / "digits.md").read_text()
    assert "| method | ACC (%)" in md and "HAT" in md and "## Configuration" in md
    assert "forget_task(0)" in md
    with (out / "digits.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == set(METHODS)
    for name in ("digits_accuracy_matrices.png", "digits_hat_capacity.png", "digits_forgetting.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hat_never_forgets_and_matrix_is_consistent(leaderboard):
    _, data = leaderboard
    for run in data["runs"]:
        matrix = run["accuracy_matrix"]
        if run["method"] == "JointTraining":
            assert len(matrix) == 1 and run["bwt"] is None
            continue
        assert len(matrix) == 5 and all(len(r) == 5 for r in matrix)
        if run["method"] == "HAT":
            for j in range(5):  # the accuracy on task j never changes after it is learned
                assert {matrix[i][j] for i in range(j, 5)} == {matrix[j][j]}
            assert run["bwt"] == 0.0 and run["forgetting"] == 0.0
        bwt = sum(matrix[4][j] - matrix[j][j] for j in range(4)) / 4
        assert math.isclose(run["bwt"], bwt, abs_tol=1e-12)


def test_forgetting_task_0_erases_it_and_keeps_the_others(leaderboard):
    """Task 0 then computes what a task never trained computes (a fresh head on a fresh task's
    masks: near chance, not exactly); tasks 1-4 are bit-identical."""
    _, data = leaderboard
    f = data["config"]["forgetting"]
    assert f["forgotten_task"] == 0
    assert f["logits_bit_identical"][0] is False
    assert f["reinitialised_parameters"] and sum(f["reinitialised_parameters"].values()) > 0
    assert f["accuracy_after"][1:] == f["accuracy_before"][1:]
    assert f["logits_bit_identical"][1:] == [True] * 4
    hat_run = next(r for r in data["runs"] if r["method"] == "HAT" and r["seed"] == 0)
    assert f["accuracy_before"] == pytest.approx(hat_run["accuracy_matrix"][-1], abs=1e-6)  # Avalanche: float32


def test_tables_and_figures_rebuild_from_the_json(leaderboard, tmp_path):
    """``--from-json`` rewrites the same tables and figures without training."""
    out, data = leaderboard
    assert cli.main(["--from-json", str(out / "digits.json"), "--out", str(tmp_path), "--name", "again"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["leaderboard"] == data["leaderboard"] and again["runs"] == data["runs"]
    assert (tmp_path / "again.md").read_text().split("## Configuration")[0] == \
        (out / "digits.md").read_text().split("## Configuration")[0]
    assert (tmp_path / "again_hat_capacity.png").exists() and (tmp_path / "again_forgetting.png").exists()


def test_python_dash_m_runs_the_command(tmp_path):
    """``python -m avalanche_hat.bench`` is wired to the same main (2 methods, 1 seed)."""
    cmd = [sys.executable, "-m", "avalanche_hat.bench", "--benchmark", "digits", "--methods", "naive,hat",
           "--epochs", "1", "--out", str(tmp_path), "--no-plots"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ACC (%)" in proc.stdout and "Naive" in proc.stdout and "HAT" in proc.stdout
    assert (tmp_path / "digits.json").exists()


def test_tune_mode_picks_values_on_the_holdout(tmp_path):
    assert cli.main(["--benchmark", "digits", "--tune", "--methods", "EWC", "--epochs", "1", "--no-progress",
                     "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "digits_tuning.json").read_text())
    assert record["benchmark"]["evaluation_set"].startswith("holdout")
    assert record["chosen"]["EWC"]["ewc_lambda"] in cli.TUNING_GRID["EWC"][1]
    assert len(record["trials"]) == len(cli.TUNING_GRID["EWC"][1])


def test_holdout_comes_from_training_data_only():
    full = make_benchmark("digits")
    tuned = make_benchmark("digits", holdout=0.1)
    assert tuned.train_size + tuned.test_size == full.train_size
    assert len(tuned.scenario.train_stream) == 5
    for exp in tuned.scenario.train_stream:
        assert exp.classes_in_this_experience == [0, 1]


def test_fmnist_missing_gives_a_clear_error(tmp_path, monkeypatch):
    import avalanche_hat.bench.data as data

    monkeypatch.setattr(data, "DEBIAN_FMNIST", tmp_path / "nowhere")
    monkeypatch.setenv("AVALANCHE_DATA", str(tmp_path / "nothing"))
    with pytest.raises(DataNotFound, match="apt-get install dataset-fashion-mnist"):
        load_fmnist()
    with pytest.raises(DataNotFound, match="holds no Fashion-MNIST"):
        load_fmnist(tmp_path)
    assert cli.main(["--data-root", str(tmp_path), "--no-progress"]) == 2


def test_fmnist_reader_reads_idx_files(tmp_path):
    """The IDX reader on a tiny hand-written Fashion-MNIST in --data-root (gzipped and plain)."""
    import gzip

    def idx(array, path, gz):
        header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
        raw = header + array.numpy().tobytes()
        (gzip.open if gz else open)(path, "wb").write(raw)

    images = torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8)
    labels = torch.arange(20, dtype=torch.uint8) % 10
    idx(images, tmp_path / "train-images-idx3-ubyte.gz", True)
    idx(labels, tmp_path / "train-labels-idx1-ubyte.gz", True)
    idx(images[:10], tmp_path / "t10k-images-idx3-ubyte", False)
    idx(labels[:10], tmp_path / "t10k-labels-idx1-ubyte", False)
    (train_x, train_y), (test_x, test_y), folder = load_fmnist(tmp_path)
    assert folder == str(tmp_path)
    assert train_x.shape == (20, 1, 28, 28) and test_x.shape == (10, 1, 28, 28)
    assert torch.equal(train_y, labels.long())
    expected = (images[3].float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(train_x[3, 0], expected)


def test_real_fmnist_when_installed():
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    spec = make_benchmark("fmnist")
    assert (spec.train_size, spec.test_size) == (60000, 10000)
    assert [len(e.dataset) for e in spec.scenario.train_stream] == [12000] * 5
    assert [e.task_label for e in spec.scenario.test_stream] == [0, 1, 2, 3, 4]


def test_method_names():
    assert resolve_methods(["all"]) == list(METHODS)
    assert resolve_methods(["hat,naive", "joint"]) == ["HAT", "Naive", "JointTraining"]
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods(["gem"])


def test_metrics_from_a_known_matrix():
    r = MethodResult("x", 0, [[0.9, 0.5], [0.7, 0.8]], 1.0, 1, 0.0, "", {})
    assert r.acc == pytest.approx(0.75)
    assert r.bwt == pytest.approx(-0.2)
    assert r.forgetting == pytest.approx(0.2)


# ------------------------------------------------------------------------- CIFAR, offline
def _write_fake_cifar(root: Path, monkeypatch, num_classes: int, per_class: int = 6):
    """A tiny CIFAR in torchvision's exact on-disk format; torchvision's checksum tables point at it
    (it checks md5s even when the files are there), so Avalanche's real loading path runs."""
    import hashlib
    import pickle

    import numpy as np
    from torchvision.datasets import CIFAR10, CIFAR100

    rng = np.random.default_rng(0)
    cls = CIFAR10 if num_classes == 10 else CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if num_classes == 10 else "fine_labels"

    def batch(n_per_class):
        labels = [c for c in range(num_classes) for _ in range(n_per_class)]
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        return {"data": data, label_key: labels}

    def md5(path):
        return hashlib.md5(path.read_bytes()).hexdigest()

    train_names = [n for n, _ in cls.train_list]
    train_list, test_list = [], []
    for name in train_names:
        (folder / name).write_bytes(pickle.dumps(batch(per_class if len(train_names) == 1 else 2)))
        train_list.append([name, md5(folder / name)])
    for name, _ in cls.test_list:
        (folder / name).write_bytes(pickle.dumps(batch(2)))
        test_list.append([name, md5(folder / name)])
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: [f"c{i}" for i in range(num_classes)]}))
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})


@pytest.mark.parametrize("name,num_classes,tasks", [("cifar10", 10, 5), ("cifar100", 100, 10), ("cifar100-20", 100, 20)])
def test_cifar_benchmarks_load_through_avalanche(tmp_path, monkeypatch, name, num_classes, tasks):
    _write_fake_cifar(tmp_path, monkeypatch, num_classes)
    spec = make_benchmark(name, data_root=tmp_path)
    assert spec.num_tasks == tasks and spec.classes_per_task == num_classes // tasks
    assert (spec.in_chans, spec.img_size) == (3, 32)
    exp = spec.scenario.train_stream[tasks - 1]
    assert exp.task_label == tasks - 1
    assert exp.classes_in_this_experience == list(range(num_classes // tasks))
    x, y, t = exp.dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_cifar10_command_runs_offline(tmp_path, monkeypatch):
    _write_fake_cifar(tmp_path / "data", monkeypatch, 10)
    out = tmp_path / "out"
    assert cli.main(["--benchmark", "cifar10", "--data-root", str(tmp_path / "data"), "--network", "cnn",
                     "--width", "32", "--methods", "naive,hat", "--epochs", "1", "--no-progress",
                     "--out", str(out), "--no-plots"]) == 0
    data = json.loads((out / "cifar10.json").read_text())
    assert data["config"]["benchmark"]["num_tasks"] == 5
    hat_run = next(r for r in data["runs"] if r["method"] == "HAT")
    assert hat_run["bwt"] == 0.0


def test_timm_networks_run_through_the_command(tmp_path, monkeypatch):
    """The timm twins of avalanche_hat.timm_models (hat_alexnet / cl_alexnet) run through the same command."""
    _write_fake_cifar(tmp_path / "data", monkeypatch, 10, per_class=2)
    out = tmp_path / "out"
    assert cli.main(["--benchmark", "cifar10", "--data-root", str(tmp_path / "data"), "--network", "alexnet",
                     "--methods", "hat,naive", "--epochs", "1", "--batch-size", "8",
                     "--no-progress", "--out", str(out), "--no-plots", "--no-forgetting"]) == 0
    data = json.loads((out / "cifar10.json").read_text())
    assert {r["method"] for r in data["runs"]} == {"HAT", "Naive"}
    hat_run, naive_run = (next(r for r in data["runs"] if r["method"] == m) for m in ("HAT", "Naive"))
    assert hat_run["bwt"] == 0.0
    assert hat_run["parameters"] > naive_run["parameters"]  # the twins differ only by HAT's embeddings


def test_packnet_on_batchnorm_network_is_skipped_not_crashed(tmp_path, monkeypatch):
    """Avalanche's PackNet cannot wrap BatchNorm: the command reports it as skipped and goes on."""
    import avalanche_hat.bench.cli as bench_cli
    from avalanche_hat.bench import strategies

    def packnet_on_batchnorm(settings, hp, plugins, evaluator):
        raise strategies.UnsupportedNetwork("Avalanche's PackNet cannot wrap network 'x': norms")

    monkeypatch.setitem(strategies.BUILDERS, "PackNet", packnet_on_batchnorm)
    out = tmp_path / "out"
    assert bench_cli.main(["--benchmark", "digits", "--methods", "packnet,naive", "--epochs", "2", "--no-progress",
                           "--out", str(out), "--no-plots"]) == 0
    data = json.loads((out / "digits.json").read_text())
    assert [r["method"] for r in data["runs"]] == ["Naive"]
    assert "PackNet" in data["config"]["skipped"]
    assert "## Skipped" in (out / "digits.md").read_text()


def test_packnet_refuses_batchnorm_trunk():
    from avalanche_hat.bench import strategies

    settings = strategies.TrainSettings(network="resnet18s", in_chans=3, img_size=32, epochs=2)
    with pytest.raises(strategies.UnsupportedNetwork, match="PackNet"):
        strategies.packnet(settings, strategies.HyperParameters(), [], None)


def test_si_fix_gives_nonzero_importances_where_avalanche_gives_none():
    """Avalanche 0.6.0's SI stores views of the live weights on the CPU: its importances are all 0.
    The benchmark's SI (parameter snapshots copied) accumulates real importances."""
    from avalanche.training import Naive
    from avalanche.training.plugins import SynapticIntelligencePlugin

    from avalanche_hat.bench import runner, strategies

    spec = make_benchmark("digits")
    settings = strategies.TrainSettings(epochs=1, batch_size=32, in_chans=1, img_size=8)
    importances = {}
    for name, cls in (("avalanche", SynapticIntelligencePlugin),
                      ("fixed", strategies.CopyingSynapticIntelligencePlugin)):
        runner.seed_everything(0)
        model = strategies._plain_model(settings)
        plugin = cls(si_lambda=1.0)
        common = strategies._common(model, settings, [plugin], runner._evaluator())
        Naive(**common).train(spec.scenario.train_stream[0])
        importances[name] = max(float(v.data.abs().max()) for v in plugin.ewc_data[1].values())
    assert importances["avalanche"] == 0.0
    assert importances["fixed"] > 0.0


def test_table_tells_exact_zero_from_rounded_zero():
    from avalanche_hat.bench.report import _fmt

    assert _fmt([0.0, 0.0], signed=True, exact_zero=True) == "0.00 ± 0.00"
    assert _fmt([-1e-5], signed=True, exact_zero=True) == "-0.00"
    assert _fmt([1e-5], exact_zero=True) == "+0.00"
    assert _fmt([-0.0596], signed=True, exact_zero=True) == "-5.96"
    assert _fmt([1e-5], scale=1.0, digits=1) == "0.0"
    assert _fmt([float("nan")]) == "n/a"


def test_cifar_without_data_or_network_gives_a_clear_error(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise OSError("no network here")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DataNotFound, match="--data-root"):
        make_benchmark("cifar10", data_root=tmp_path)
    assert cli.main(["--benchmark", "cifar10", "--data-root", str(tmp_path), "--no-progress"]) == 2


def test_paired_differences_against_hat():
    from avalanche_hat.bench.report import aggregate, paired_differences

    def result(method, seed, acc):
        return MethodResult(method, seed, [[acc, acc]], 1.0, 1, 0.0, "", {})

    runs = [result("HAT", 0, 0.90), result("HAT", 1, 0.80), result("HAT", 2, 0.85),
            result("EWC", 0, 0.89), result("EWC", 1, 0.78), result("EWC", 2, 0.85),
            result("LwF", 1, 0.81), result("Naive", 0, 0.5)]
    pairs = {p["method"]: p for p in paired_differences(aggregate(runs))}
    assert set(pairs) == {"EWC"}  # LwF and Naive share fewer than 2 seeds with HAT
    ewc = pairs["EWC"]
    assert ewc["seeds"] == 3
    assert ewc["mean"] == pytest.approx(1.0)  # (1 + 2 + 0) / 3 points
    assert ewc["standard_error"] == pytest.approx(1.0 / 3 ** 0.5)
    assert paired_differences(aggregate([r for r in runs if r.method != "HAT"])) == []
