"""The leaderboard command's edges (options, help, data folder), Permuted Fashion-MNIST, merged
reports, the figures' helpers, and README's tables against the committed JSON. All fast: no training
except a 2-task, 100-image Permuted run."""
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avalanche_hat.bench import cli
from avalanche_hat.bench import readme as readme_tables
from avalanche_hat.bench.data import DataNotFound, make_benchmark, pixel_permutations
from avalanche_hat.bench.options import TUNED, tuned_coefficients
from avalanche_hat.bench.runner import MethodResult

ROOT = Path(__file__).resolve().parents[1]


def _write_idx(array: torch.Tensor, path: Path) -> None:
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path):
    """A Fashion-MNIST of 200 training and 100 test images in the IDX format, in ``tmp_path``."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 200), ("t10k", 100)):
        _write_idx(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g),
                   tmp_path / f"{split}-images-idx3-ubyte.gz")
        _write_idx((torch.arange(n) % 10).to(torch.uint8), tmp_path / f"{split}-labels-idx1-ubyte.gz")
    return tmp_path


# ------------------------------------------------------------------------------------- the help
def _help_text() -> str:
    return cli.build_parser().format_help()


def test_help_imports_neither_avalanche_nor_timm():
    code = ("import sys\nfrom avalanche_hat.bench.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('avalanche', 'timm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: avalanche-hat-bench" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "QP solver" not in proc.stderr


def test_help_shows_every_coefficient_default_once_and_reads_right():
    text = " ".join(_help_text().split())
    for flag, fmnist_value in (("--ewc-lambda", "100000"), ("--si-lambda", "1000"), ("--lwf-alpha", "10"),
                               ("--hat-reg-coef", "0.75")):
        part = text.split(flag + " ", 2)[2].split(" --", 1)[0]  # the option's own help
        assert f"fmnist: {fmnist_value}" in part, (flag, part)
    assert "(default: None)" not in text
    assert text.count("1/T") >= 1 and "(default 1/T) (default" not in text
    reject = text.split("--no-hat-reject-head ", 1)[1].split(" --", 1)[0]
    assert "(default: True)" not in reject and "by default HAT trains one" in reject
    assert "leaderboard-results" in text


def test_gitignore_names_the_default_output_folder():
    assert f"{cli.DEFAULT_OUT}/" in (ROOT / ".gitignore").read_text().split()


# ------------------------------------------------------------------------------ defaults per board
def _resolved(argv):
    args = cli.build_parser().parse_args(argv)
    return args, cli.resolve_defaults(args)


def test_coefficients_follow_the_benchmark_they_were_tuned_on():
    args, source = _resolved([])
    assert args.benchmark == "fmnist" and args.ewc_lambda == 1e5 and "tuned on fmnist" in source
    args, _ = _resolved(["--scenario", "class"])
    assert (args.ewc_lambda, args.si_lambda, args.lwf_alpha) == (1e4, 1e4, 0.1)
    args, source = _resolved(["--benchmark", "digits"])
    assert "not tuned on digits" in source or TUNED.get(("digits", "task"))
    args, _ = _resolved(["--benchmark", "fmnist", "--ewc-lambda", "3"])
    assert args.ewc_lambda == 3.0  # the user's value wins


def test_tasks_implies_permuted_fmnist_and_sizes_the_budget():
    args, _ = _resolved(["--tasks", "50"])
    assert args.benchmark == "pfmnist" and args.tasks == 50
    assert args.train_per_task * 50 <= 30000 and args.test_per_task >= 100
    args, _ = _resolved(["--benchmark", "pfmnist"])
    assert args.tasks == 10 and args.epochs == 10
    with pytest.raises(SystemExit):
        cli.main(["--benchmark", "fmnist", "--tasks", "20"])
    with pytest.raises(SystemExit):
        cli.main(["--benchmark", "pfmnist", "--scenario", "class"])


# ------------------------------------------------------------------------------ the data folder
def test_data_root_without_the_files_is_an_error_not_a_fall_back(tmp_path, capsys):
    """An empty --data-root must not silently train on Debian's copy."""
    assert cli.main(["--data-root", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "train-images-idx3-ubyte" in err
    with pytest.raises(DataNotFound, match="does not exist"):
        make_benchmark("fmnist", data_root=tmp_path / "typo")
    with pytest.raises(DataNotFound, match="scikit-learn"):
        make_benchmark("digits", data_root=tmp_path)


# ------------------------------------------------------------------------ Permuted Fashion-MNIST
def test_permuted_fmnist_is_one_fixed_permutation_per_task(tiny_fmnist):
    spec = make_benchmark("pfmnist", data_root=tiny_fmnist, num_tasks=3, train_per_task=100, test_per_task=50)
    assert (spec.num_tasks, spec.classes_per_task, spec.train_size, spec.test_size) == (3, 10, 100, 50)
    assert spec.describe()["images_per_task"]
    train, test = spec.scenario.train_stream, spec.scenario.test_stream
    assert [e.task_label for e in train] == [0, 1, 2] and [e.task_label for e in test] == [0, 1, 2]
    perms = pixel_permutations(3, 784, seed=0)
    assert not torch.equal(perms[0], perms[1])
    assert torch.equal(pixel_permutations(2, 784, seed=0)[1], perms[1])  # independent of the length
    base = None
    for t, exp in enumerate(train):
        assert sorted(exp.classes_in_this_experience) == list(range(10))
        x = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))]).flatten(1)
        unpermuted = torch.empty_like(x)
        unpermuted[:, perms[t]] = x  # undo task t's permutation: the same images in every task
        base = unpermuted if base is None else base
        assert torch.equal(unpermuted, base)
    other = make_benchmark("pfmnist", data_root=tiny_fmnist, num_tasks=3, data_seed=1, train_per_task=100)
    assert not torch.equal(other.scenario.train_stream[0].dataset[0][0], train[0].dataset[0][0])


def test_permuted_command_evaluates_seen_tasks_and_records_costs(tiny_fmnist, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["--data-root", str(tiny_fmnist), "--tasks", "2", "--train-per-task", "100",
                     "--test-per-task", "50", "--methods", "HAT", "Naive", "--epochs", "2", "--no-progress",
                     "--no-forgetting", "--out", str(out)]) == 0
    data = json.loads((out / "pfmnist.json").read_text())
    for run in data["runs"]:
        assert run["accuracy_matrix"][0][1] is None  # task 1 not learned yet: not evaluated
        assert len(run["task_seconds"]) == len(run["task_steps"]) == len(run["task_peak_memory_mb"]) == 2
        assert all(n == 2 * math.ceil(100 / 64) for n in run["task_steps"])
    hat = next(r for r in data["runs"] if r["method"] == "HAT")
    assert len(hat["owned_after_task"]) == 2 and hat["bwt"] == 0.0
    for name in ("pfmnist_mean_accuracy_seen.png", "pfmnist_sequence.png", "pfmnist_accuracy_matrices.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    md = (out / "pfmnist.md").read_text()
    assert "Mean accuracy over the tasks seen" in md and "Train time per training step" in md
    assert "| task 0 | " in md and "–" in md
    # and back from the JSON (None cells read as NaN)
    assert cli.main(["--from-json", str(out / "pfmnist.json"), "--out", str(tmp_path / "again"), "--no-plots"]) == 0


# ------------------------------------------------------------------------------- merged reports
def _board(methods, seeds=(0,), benchmark="fmnist", load_seconds=1.0):
    runs = [MethodResult(method=m, seed=s, matrix=[[0.9, 0.5], [0.9, 0.8]], train_seconds=1.0, parameters=10,
                         peak_memory_mb=1.0, memory_kind="x", config={}).to_dict() for m in methods for s in seeds]
    config = {"command": f"avalanche-hat-bench --methods {' '.join(methods)}", "benchmark": {"benchmark": benchmark, "load_seconds": load_seconds},
              "settings": {"epochs": 1}, "methods": list(methods), "seeds": list(seeds),
              "hyper_parameters": {m: {} for m in methods}, "total_wall_seconds": 1.0}
    return {"config": config, "runs": runs}


def test_leaderboards_of_the_same_board_merge_and_others_do_not():
    merged = cli.merge_leaderboards([_board(["HAT"]), _board(["Naive", "EWC"], load_seconds=2.5)])
    assert [r["method"] for r in merged["runs"]] == ["HAT", "Naive", "EWC"]
    assert merged["config"]["methods"] == ["HAT", "Naive", "EWC"]
    assert len(merged["config"]["merged_commands"]) == 2
    with pytest.raises(ValueError, match="benchmark"):
        cli.merge_leaderboards([_board(["HAT"]), _board(["Naive"], benchmark="digits")])
    with pytest.raises(ValueError, match="more than one"):
        cli.merge_leaderboards([_board(["HAT"]), _board(["HAT"])])


# ----------------------------------------------------------------------------------- figures
def test_matrix_cells_never_round_up_to_100():
    from avalanche_hat.bench.plots import cell_text

    assert cell_text(99.95, 2) == "99.95"
    assert cell_text(99.95, 1) == "99.9"
    assert cell_text(100.0, 1) == "100.0"
    assert cell_text(87.26, 1) == "87.3"


def test_capacity_figure_has_a_shared_bar_for_every_row(tmp_path, monkeypatch):
    from avalanche_hat.bench import plots

    capacity = {"usage": {"0": 0.1, "1": 0.2}, "owned": 0.25,
                "layers": [{"name": "fc1", "units": 300, "usage": {"0": 0.1, "1": 0.2}, "owned": 0.3, "shared": 0.2},
                           {"name": "fc2", "units": 100, "usage": {"0": 0.1, "1": 0.2}, "owned": 0.1, "shared": 0.1}]}
    calls = []
    barh = plots.plt.Axes.barh

    def spy(self, y, width, *args, **kwargs):
        calls.append((kwargs.get("label"), list(y), list(width)))
        return barh(self, y, width, *args, **kwargs)

    monkeypatch.setattr(plots.plt.Axes, "barh", spy)
    plots.hat_capacity(capacity, tmp_path / "c.png")
    shared = next(c for c in calls if c[0] and c[0].startswith("shared"))
    assert len(shared[1]) == 3  # fc1, fc2 and "all"
    assert shared[2][-1] == pytest.approx(100 * (0.2 * 300 + 0.1 * 100) / 400)


# --------------------------------------------------------------------------- README's tables
def test_readme_tables_are_what_the_committed_json_gives():
    text = (ROOT / "README.md").read_text()
    generated = readme_tables.tables(ROOT / "benchmarks" / "results")
    assert set(generated) == set(readme_tables.BOARDS)  # every board has its committed JSON
    found = readme_tables.readme_blocks(text)
    assert set(found) == set(generated), "README lacks the markers of a board"
    for name, table in generated.items():
        assert found[name] == table, f"README's {name} table is stale: run python -m avalanche_hat.bench.readme"


def test_readme_table_follows_the_json(tmp_path):
    """The check can fail: a changed JSON gives another table than README's."""
    data = json.loads((ROOT / "benchmarks" / "results" / "fmnist.json").read_text())
    before = readme_tables.board_table(data, "r.md")
    data["leaderboard"][0]["acc_mean"] -= 0.001
    assert readme_tables.board_table(data, "r.md") != before
    text = "a\n<!-- leaderboard:fmnist -->\nold\n<!-- /leaderboard:fmnist -->\nb"
    assert readme_tables.render(text, {"fmnist": before}) == f"a\n<!-- leaderboard:fmnist -->\n{before}\n" \
                                                               "<!-- /leaderboard:fmnist -->\nb"
    with pytest.raises(ValueError, match="markers"):
        readme_tables.render("no markers", {"fmnist": before})


def test_tuned_coefficients_name_their_record():
    for (bench, scenario), entry in TUNED.items():
        assert (ROOT / entry["record"]).exists(), entry["record"]
        values, source = tuned_coefficients(bench, scenario)
        assert values == entry["values"] and entry["record"] in source
