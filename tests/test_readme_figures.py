"""Figures the prose quotes from the committed reports (benchmarks/results/*.json): they must be the
reports' own numbers, so that a re-run that changes a report shows up here. The prose is README and
the pages it moved to: the reports' notes (benchmarks/results/*_notes.md) and the docs site."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def readme():
    pages = [ROOT / "README.md", *sorted(RESULTS.glob("*_notes.md")), *sorted((ROOT / "docs").rglob("*.md"))]
    return " ".join(" ".join(p.read_text() for p in pages).split())  # line breaks as spaces


def report(name):
    return json.loads((RESULTS / name).read_text())


def hat_run(data, seed):
    return next(r for r in data["runs"] if r["method"] == "HAT" and r["seed"] == seed)


def pct(x):
    return f"{100 * x + 1e-9:.1f}%"  # a tie (77.35) rounds up, as README rounds


def test_hats_capacity_after_the_last_task(readme):
    capacity = hat_run(report("fmnist.json"), 0)["capacity"]
    used = capacity["usage"][str(max(int(t) for t in capacity["usage"]))]
    shared = capacity["usage"][str(max(int(t) for t in capacity["usage"]) - 1)]  # what task 4 reuses
    quoted = re.search(r"after 5 tasks HAT uses ([\d.]+%) of the hidden units \(seed 0\), most of them \(([\d.]+%)\) shared", readme)
    assert quoted, "README no longer quotes HAT's capacity in the expected words"
    assert quoted.groups() == (pct(used), pct(shared))


def test_paired_differences_against_hat(readme):
    for row in report("fmnist.json")["paired_vs_HAT"]:
        if row["method"] in ("SI", "Naive"):
            continue  # not quoted
        figure = f"{row['mean']:+.3f} ({row['standard_error']:.3f})".replace("-", "−")
        assert f"{row['method']} {figure}" in readme, (row["method"], figure)


def test_hats_accuracy_per_seed_after_the_rerun(readme):
    data = report("fmnist.json")
    for seed in (0, 1, 2):
        acc = f"{100 * hat_run(data, seed)['acc']:.2f}"
        assert re.search(rf"seed {seed} [\d.]+ -> {re.escape(acc)}", readme), (seed, acc)


def test_task_id_prediction_accuracies_of_the_class_incremental_run(readme):
    run = hat_run(report("fmnist_class.json"), 0)["task_inference"]
    names = {"mahalanobis": "Mahalanobis", "reject": "reject head", "energy": "energy",
             "msp": "maximum softmax", "entropy": "entropy"}
    for key, name in names.items():
        got = run["task_accuracy"][key]
        assert f"{name} {pct(got['calibrated'])} / {pct(got['raw'])}" in readme, name
    assert f"the same model reaches {100 * run['task_incremental_accuracy']:.2f}%" in readme
    assert f"{run['cost']['ratio']:.2f}x for seed 0" in readme


def test_tuning_grids_in_the_configuration_table(readme):
    chosen = report("fmnist_tuning.json")["chosen"]
    for method, values in chosen.items():
        grid = ", ".join(f"{100 * v:.2f}" for v in values["grid"].values())
        best = f"{100 * values['holdout_acc']:.2f}"
        assert grid.replace(best, f"**{best}**", 1) in readme.replace(" (diverges)", ""), (method, grid)
