"""The leaderboard: one row per method (mean and spread over seeds), as Markdown, CSV and JSON."""
from __future__ import annotations

import csv
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runner import MethodResult

COLUMNS = ("method", "ACC (%)", "BWT (%)", "forgetting (%)", "train time (s)", "parameters", "peak memory (MB)")


@dataclass
class Row:
    method: str
    seeds: list[int]
    acc: list[float]
    bwt: list[float]
    forgetting: list[float]
    train_seconds: list[float]
    parameters: int
    peak_memory_mb: list[float]


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def aggregate(results: list[MethodResult]) -> list[Row]:
    """One row per method, in the order the methods were first run, sorted by mean ACC (best first)."""
    rows: dict[str, Row] = {}
    for r in results:
        row = rows.setdefault(r.method, Row(r.method, [], [], [], [], [], r.parameters, []))
        row.seeds.append(r.seed)
        row.acc.append(r.acc)
        row.bwt.append(r.bwt)
        row.forgetting.append(r.forgetting)
        row.train_seconds.append(r.train_seconds)
        row.peak_memory_mb.append(r.peak_memory_mb)
    return sorted(rows.values(), key=lambda row: -_mean_std(row.acc)[0])


def _fmt(values: list[float], scale: float = 100.0, digits: int = 2, signed: bool = False,
         exact_zero: bool = False) -> str:
    """Mean (± std over seeds). With ``exact_zero``, only an exact 0 prints as 0.00; a non-zero
    value that rounds to zero keeps its sign (-0.00, +0.00), so zero forgetting can be told from
    small forgetting."""
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "n/a"
    rounds_to_zero = abs(scale * mean) < 0.5 * 10 ** -digits
    if mean == 0.0:
        text = f"{0:.{digits}f}"
    else:
        sign = "+" if signed or (exact_zero and rounds_to_zero) else ""
        text = f"{scale * mean:{sign}.{digits}f}"
        if rounds_to_zero and not exact_zero:
            text = f"{0:.{digits}f}"
    if len(values) > 1:
        text += f" ± {scale * std:.{digits}f}"
    return text


def format_row(row: Row) -> list[str]:
    return [
        row.method,
        _fmt(row.acc),
        _fmt(row.bwt, signed=True, exact_zero=True),
        _fmt(row.forgetting, exact_zero=True),
        _fmt(row.train_seconds, scale=1.0, digits=1),
        f"{row.parameters:,}",
        _fmt(row.peak_memory_mb, scale=1.0, digits=1),
    ]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for row in rows:
        lines.append("| " + " | ".join(format_row(row)) + " |")
    return "\n".join(lines)


def text_table(rows: list[Row]) -> str:
    """The table for the terminal (fixed-width columns)."""
    cells = [list(COLUMNS)] + [format_row(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    out = []
    for k, c in enumerate(cells):
        out.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def matrix_markdown(result: MethodResult) -> str:
    """``matrix[i][j]`` as a table: rows = after training task i, columns = task j."""
    t = len(result.matrix[0])
    head = "| after | " + " | ".join(f"task {j}" for j in range(t)) + " |"
    lines = [head, "|---|" + "---:|" * t]
    labels = ["all tasks (joint)"] if len(result.matrix) == 1 else [f"task {i}" for i in range(len(result.matrix))]
    for label, row in zip(labels, result.matrix):
        lines.append(f"| {label} | " + " | ".join("–" if math.isnan(v) else f"{100 * v:.2f}" for v in row) + " |")
    return "\n".join(lines)


def checkpoints(num_tasks: int) -> list[int]:
    """The numbers of tasks learned that the sequence tables show: every one up to 10, else about ten."""
    if num_tasks <= 10:
        return list(range(1, num_tasks + 1))
    step = 5 if num_tasks <= 25 else 10
    return sorted({1, *range(step, num_tasks + 1, step), num_tasks})


def _by_method(results: list[MethodResult]) -> dict[str, list[MethodResult]]:
    out: dict[str, list[MethodResult]] = {}
    for r in results:
        out.setdefault(r.method, []).append(r)
    return out


def seen_markdown(results: list[MethodResult]) -> str:
    """Mean accuracy over the tasks seen so far after each number of tasks learned (mean over seeds),
    one row per method, best final value first. Empty without sequential runs."""
    methods = {m: rs for m, rs in _by_method(results).items() if len(rs[0].matrix) > 1}
    if not methods:
        return ""
    n = len(next(iter(methods.values()))[0].matrix)
    cols = checkpoints(n)
    table = {m: np.mean([r.mean_seen for r in rs], axis=0) for m, rs in methods.items()}
    order = sorted(table, key=lambda m: -table[m][-1])
    lines = ["| method | " + " | ".join(f"{k}" for k in cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in order:
        lines.append(f"| {m} | " + " | ".join(f"{100 * table[m][k - 1]:.2f}" for k in cols) + " |")
    return "\n".join(lines)


def sequence_markdown(results: list[MethodResult]) -> str:
    """Per method (first seed) at a few numbers of tasks learned: the first task's accuracy, the
    train time per training step and the peak memory so far; HAT's owned capacity. Empty for runs
    without per-task records."""
    runs = {m: rs[0] for m, rs in _by_method(results).items() if rs[0].task_seconds and len(rs[0].matrix) > 1}
    if not runs:
        return ""
    n = len(next(iter(runs.values())).matrix)
    cols = checkpoints(n)
    out = []
    for title, cell in (
        ("Accuracy on task 0 (%) after k tasks", lambda r, k: f"{100 * r.matrix[k - 1][0]:.2f}"),
        ("Train time per training step (ms) of the k-th task", lambda r, k: f"{1000 * r.seconds_per_step[k - 1]:.1f}"),
        ("Peak memory so far (MB) after k tasks", lambda r, k: f"{r.task_peak_memory_mb[k - 1]:.1f}"),
    ):
        out += [f"### {title}", "", "| method | " + " | ".join(f"k={k}" for k in cols) + " |",
                "|---|" + "---:|" * len(cols)]
        out += [f"| {m} | " + " | ".join(cell(r, k) for k in cols) + " |" for m, r in runs.items()]
        out.append("")
    hat = runs.get("HAT")
    if hat is not None and hat.owned_after_task:
        out += ["### HAT: share of its units some task owns after k tasks", "",
                "| | " + " | ".join(f"k={k}" for k in cols) + " |", "|---|" + "---:|" * len(cols),
                "| owned (%) | " + " | ".join(f"{100 * hat.owned_after_task[k - 1]:.1f}" for k in cols) + " |"]
        if hat.capacity:
            out.append("| used by task k-1 (%) | " + " | ".join(
                f"{100 * hat.capacity['usage'][str(k - 1)]:.1f}" for k in cols) + " |")
        out.append("")
    ratio = _step_growth(runs)
    if ratio:
        out += ["### Growth of the step cost", "",
                "Median train time per step over the last quarter of the tasks divided by the median over the "
                "first quarter (1.0: a step costs the same whatever the number of tasks learned):", "",
                "| method | ratio |", "|---|---:|"] + [f"| {m} | {v:.2f} |" for m, v in ratio.items()] + [""]
    return "\n".join(out)


def _step_growth(runs: dict[str, MethodResult]) -> dict[str, float]:
    out = {}
    for m, r in runs.items():
        per_step = r.seconds_per_step
        q = len(per_step) // 4
        if q >= 1:
            out[m] = float(np.median(per_step[-q:]) / np.median(per_step[:q]))
    return out


def environment() -> dict:
    import torch

    import avalanche_hat

    try:
        from importlib.metadata import version

        avalanche_version = version("avalanche-lib")
    except Exception:  # pragma: no cover - not installed as a distribution
        avalanche_version = "unknown"
    return {
        "avalanche_hat": avalanche_hat.__version__, "avalanche_lib": avalanche_version, "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def paired_differences(rows: list[Row], reference: str = "HAT") -> list[dict]:
    """ACC of ``reference`` minus each other method's, paired by seed (the seeds both ran): mean and
    standard error in points. Paired by seed, the seed-to-seed spread the methods share cancels, so a
    difference smaller than about two standard errors is a tie. Empty with fewer than 2 shared seeds."""
    ref = next((row for row in rows if row.method == reference), None)
    if ref is None:
        return []
    ref_acc = dict(zip(ref.seeds, ref.acc))
    out = []
    for row in rows:
        if row is ref:
            continue
        diffs = [100.0 * (ref_acc[s] - a) for s, a in zip(row.seeds, row.acc) if s in ref_acc]
        if len(diffs) < 2:
            continue
        out.append({"method": row.method, "seeds": len(diffs), "mean": float(np.mean(diffs)),
                    "standard_error": float(np.std(diffs, ddof=1) / math.sqrt(len(diffs)))})
    return out


def paired_markdown(pairs: list[dict], reference: str = "HAT") -> str:
    lines = [f"## {reference} minus each method, paired by seed", "",
             f"ACC of {reference} minus the method's on the same seed, in points: mean (standard error) over "
             "the seeds both ran. Within about two standard errors of 0 the two are tied on this benchmark.", "",
             "| method | seeds | difference (points) |", "|---|---:|---:|"]
    lines += [f"| {p['method']} | {p['seeds']} | {p['mean']:+.3f} ({p['standard_error']:.3f}) |" for p in pairs]
    return "\n".join(lines)


def write_outputs(out_dir: Path, stem: str, rows: list[Row], results: list[MethodResult], config: dict,
                  extra_markdown: str = "", env: dict | None = None, notes: str = "") -> dict[str, Path]:
    """``<stem>.md``, ``<stem>.csv``, ``<stem>.json`` in ``out_dir``; returns their paths. ``env``: the
    versions and machine of the run (default: this process's). ``notes``: hand-written Markdown placed
    after the table (the reading of the board, from ``<stem>_notes.md``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"{stem}.{k}" for k in ("md", "csv", "json")}

    bench = config.get("benchmark", {})
    setting = f" ({bench['scenario']})" if bench.get("scenario", "task-incremental") != "task-incremental" else ""
    md = [f"# Leaderboard: {bench.get('benchmark', '?')}{setting}", "",
          *([f"Command: `{config.get('command', '')}`"] if not config.get("merged_commands") else
            ["Commands (runs of separate processes, merged with `--from-json`):", "",
             *(f"- `{c}`" for c in config["merged_commands"])]), "", markdown_table(rows), "",
          "ACC: mean final accuracy over tasks. BWT: mean over tasks 0..T-2 of (final accuracy - accuracy "
          "right after learning the task). Forgetting: mean over tasks 0..T-2 of (best accuracy before the "
          "last task - final accuracy). JointTraining learns all tasks at once: BWT and forgetting do not "
          "apply. In the BWT and forgetting columns only an exact 0 prints as 0.00; a value that merely rounds "
          f"to 0 keeps its sign (-0.00, +0.00). Peak memory: {results[0].memory_kind if results else ''}. "
          f"Seeds: {config.get('seeds')}; ± is the standard deviation over seeds.", ""]
    if notes:
        md += [notes.strip(), ""]
    pairs = paired_differences(rows)
    if pairs:
        md += [paired_markdown(pairs), ""]
    md += ["## Accuracy matrices (first seed)", ""]
    first_seed = results[0].seed if results else None
    for r in results:
        if r.seed == first_seed:
            md += [f"### {r.method}", "", matrix_markdown(r), ""]
    if extra_markdown:
        md += [extra_markdown, ""]
    md += ["## Configuration", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    paths["md"].write_text("\n".join(md))

    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seeds", "acc_mean", "acc_std", "bwt_mean", "bwt_std", "forgetting_mean",
                    "forgetting_std", "train_seconds_mean", "train_seconds_std", "parameters",
                    "peak_memory_mb_mean", "peak_memory_mb_std"])
        for row in rows:
            w.writerow([row.method, " ".join(map(str, row.seeds)), *_mean_std(row.acc), *_mean_std(row.bwt),
                        *_mean_std(row.forgetting), *_mean_std(row.train_seconds), row.parameters,
                        *_mean_std(row.peak_memory_mb)])

    payload = {
        "config": config,
        "environment": env or environment(),
        "leaderboard": [
            {"method": row.method, "seeds": row.seeds,
             **{f"{k}_mean": _mean_std(getattr(row, k))[0] for k in ("acc", "bwt", "forgetting", "train_seconds",
                                                                   "peak_memory_mb")},
             **{f"{k}_std": _mean_std(getattr(row, k))[1] for k in ("acc", "bwt", "forgetting", "train_seconds",
                                                                  "peak_memory_mb")},
             "parameters": row.parameters}
            for row in rows
        ],
        "paired_vs_HAT": pairs,
        "runs": [r.to_dict() for r in results],
    }
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=2))
    return paths


def _jsonable(obj):
    """NaN becomes null (JSON has no NaN)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def task_inference_markdown(results: list[MethodResult]) -> str:
    """Class-incremental HAT: for every task score, the task-id prediction accuracy and the resulting
    class-incremental accuracy, calibrated (z-normalised per task) and raw, mean (± std) over
    seeds; then the accuracy of the same models with the task ids given, and the cost of
    task-id prediction."""
    runs = [r.task_inference for r in results if r.task_inference]
    if not runs:
        return ""
    chosen = runs[0]["task_score"]
    lines = ["| task score | task-id accuracy (%) | raw (%) | class-incremental ACC (%) | raw (%) |",
             "|---|---:|---:|---:|---:|"]
    for method in runs[0]["task_accuracy"]:
        cells = [_fmt([run[kind][method][cal] for run in runs])
                 for kind, cal in (("task_accuracy", "calibrated"), ("task_accuracy", "raw"),
                                   ("accuracy", "calibrated"), ("accuracy", "raw"))]
        name = f"**{method}** (used)" if method == chosen else method
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cost = [run["cost"] for run in runs if run.get("cost")]
    lines += ["", f"With the task ids given, the same models reach "
                  f"{_fmt([run['task_incremental_accuracy'] for run in runs])}% (task-incremental ACC)."]
    if cost:
        lines.append(f"Task-id prediction over {cost[0]['tasks']} tasks (one batched pass, scores, output over all "
                     f"classes) costs {_fmt([c['ratio'] for c in cost], scale=1.0)} times one task's forward "
                     f"(batch {cost[0]['batch']}, median CPU time).")
    return "\n".join(lines)
