"""Figures: the accuracy matrix of every method, HAT's capacity per task, the forgetting experiment,
mean accuracy over the tasks seen, and how accuracy and cost evolve over a long sequence."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def cell_text(value: float, digits: int) -> str:
    """A percentage with ``digits`` decimals that never reads 100 unless it is 100 (99.95 with one
    decimal shows 99.9, not 100.0)."""
    text = f"{value:.{digits}f}"
    if value < 100.0 and float(text) >= 100.0:
        text = f"{math.floor(value * 10 ** digits) / 10 ** digits:.{digits}f}"
    return text


def accuracy_matrices(results, path: Path, title: str = "", vmin: float = 50.0) -> Path:
    """One heat map per method: row i = after training task i, column j = accuracy on task j (%).
    The cells of tasks not yet learned are greyed (their head is untrained, or they were not
    evaluated). The colour scale starts at ``vmin`` (50: chance of a 2-class task; 0 for
    class-incremental accuracy; 10 for 10-class tasks). Cells print two decimals up to 6 tasks, one
    up to 12, none beyond."""
    n = len(results)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.2 * rows + 0.6), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.axis("off")
    cmap = plt.get_cmap("viridis")
    for ax, r in zip(axes.flat, results):
        m = 100 * np.asarray(r.matrix)
        t = m.shape[1]
        joint = m.shape[0] == 1
        shown = np.ma.masked_invalid(m)
        if not joint:
            shown.mask = shown.mask | np.triu(np.ones_like(m, dtype=bool), k=1)  # tasks not learned yet
        ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=100, aspect="auto")
        ax.set_facecolor("#eeeeee")
        digits = 2 if t <= 6 else 1 if t <= 12 else None
        if digits is not None:
            for i in range(m.shape[0]):
                for j in range(t):
                    if (joint or j <= i) and not np.isnan(m[i, j]):
                        ax.text(j, i, cell_text(m[i, j], digits), ha="center", va="center",
                                fontsize=7 if t <= 6 else 5,
                                color="white" if m[i, j] < vmin + 0.6 * (100 - vmin) else "black")
        ticks = range(0, t, 1 if t <= 12 else max(1, t // 10))
        ax.set_xticks(list(ticks))
        ax.set_xticklabels([str(j) for j in ticks], fontsize=7)
        rows_ticks = range(0, m.shape[0], 1 if m.shape[0] <= 12 else max(1, m.shape[0] // 10))
        ax.set_yticks(list(rows_ticks))
        ax.set_yticklabels(["all"] if joint else [str(i) for i in rows_ticks], fontsize=7)
        ax.set_xlabel("evaluated on task", fontsize=8)
        ax.set_ylabel("joint training" if joint else "after training task", fontsize=8)
        ax.set_title(f"{r.method}: ACC {100 * r.acc:.2f}%", fontsize=9)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(vmin, 100))
    fig.colorbar(sm, ax=axes, shrink=0.8, label="accuracy (%)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def hat_capacity(capacity: dict, path: Path, title: str = "") -> Path:
    """Share of each HAT layer's units that each task's binary mask keeps, and how much of the
    network the learned tasks own together."""
    layers = capacity["layers"]
    tasks = sorted(int(t) for t in capacity["usage"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(10, 0.35 * len(tasks) + 4), 3.6),
                                  gridspec_kw={"width_ratios": [3, 1.2]})
    width = 0.8 / (len(layers) + 1)
    x = np.arange(len(tasks))
    for k, layer in enumerate(layers):
        ax.bar(x + k * width, [100 * layer["usage"][str(t)] for t in tasks], width,
               label=f"{layer['name']} ({layer['units']} units)")
    ax.bar(x + len(layers) * width, [100 * capacity["usage"][str(t)] for t in tasks], width, color="black",
           label="all layers (unit-weighted)")
    ax.set_xticks(x + width * len(layers) / 2)
    ax.set_xticklabels([f"task {t}" if len(tasks) <= 10 else str(t) for t in tasks],
                       fontsize=None if len(tasks) <= 10 else 6)
    ax.set_ylabel("units used by the task (%)")
    ax.set_ylim(0, 122)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=7, loc="upper center", ncol=min(3, len(layers) + 1), frameon=False)
    ax.set_title("Units each task's binary mask keeps", fontsize=9)
    owned = [100 * layer["owned"] for layer in layers] + [100 * capacity["owned"]]
    units = sum(layer["units"] for layer in layers)
    shared = [100 * layer["shared"] for layer in layers]
    shared.append(sum(s * layer["units"] for s, layer in zip(shared, layers)) / units)  # "all": unit-weighted
    names = [layer["name"] for layer in layers] + ["all"]
    y = np.arange(len(names))
    ax2.barh(y, owned, color="#4c72b0", label="used by >= 1 task")
    ax2.barh(y, shared, color="#dd8452", label="shared by >= 2 tasks")
    ax2.set_yticks(y)
    ax2.set_yticklabels(names, fontsize=8)
    ax2.set_xlim(0, 100)
    ax2.set_xlabel("% of units")
    ax2.invert_yaxis()
    ax2.legend(fontsize=7, loc="lower right")
    ax2.set_title(f"Capacity used: {100 * capacity['owned']:.1f}%", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def forgetting_bars(before: list[float], after: list[float], forgotten: int, path: Path, chance: float) -> Path:
    """Per-task accuracy before and after forgetting one task (the paper's Table 2)."""
    t = len(before)
    x = np.arange(t)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(x - 0.2, [100 * v for v in before], 0.4, label="before forgetting")
    ax.bar(x + 0.2, [100 * v for v in after], 0.4, label=f"after forget_task({forgotten})")
    ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x)
    ax.set_xticklabels([f"task {j}" for j in range(t)])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    # Below the axes: inside, the legend covers the last task's bars.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, frameon=False)
    ax.set_title("HAT: forgetting one task leaves the others unchanged", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _by_method(results) -> dict:
    out: dict = {}
    for r in results:
        out.setdefault(r.method, []).append(r)
    return out


def mean_accuracy_seen(results, path: Path, title: str = "", chance: float | None = None) -> Path:
    """Mean accuracy over the tasks seen so far against the number of tasks learned, one line per
    method (mean over seeds; joint training, trained once on every task, is a marker at the end)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, runs in _by_method(results).items():
        curves = np.array([r.mean_seen for r in runs]) * 100
        if curves.shape[1] == 1:  # joint training
            ax.plot([len(runs[0].matrix[0])], [curves.mean()], marker="*", markersize=10, linestyle="none",
                    color="black", label=f"{method} (all tasks at once)")
            continue
        x = np.arange(1, curves.shape[1] + 1)
        ax.plot(x, curves.mean(0), marker="o" if len(x) <= 20 else None, markersize=3,
                label=method, linewidth=2.2 if method == "HAT" else 1.2)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("tasks learned")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("mean accuracy over the tasks seen (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def long_sequence(results, path: Path, title: str = "") -> Path:
    """Four panels against the number of tasks learned, one line per method (first seed): the
    first task's accuracy, HAT's capacity (share of its units some task owns, and each task's
    usage), train time per training step, and peak memory so far."""
    runs = {m: rs[0] for m, rs in _by_method(results).items()}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (a, b), (c, d) = axes
    for method, r in runs.items():
        n = len(r.matrix)
        if n < 2:
            continue  # joint training: one training call, nothing over time
        x = np.arange(1, n + 1)
        width = 2.2 if method == "HAT" else 1.1
        a.plot(x, [100 * row[0] for row in r.matrix], label=method, linewidth=width)
        c.plot(x, [1000 * v for v in r.seconds_per_step], label=method, linewidth=width)
        d.plot(x, r.task_peak_memory_mb, label=method, linewidth=width)
    a.set_ylabel("accuracy on task 0 (%)")
    a.set_title("The first task over time", fontsize=9)
    hat = runs.get("HAT")
    if hat is not None and hat.owned_after_task:
        x = np.arange(1, len(hat.owned_after_task) + 1)
        b.plot(x, [100 * v for v in hat.owned_after_task], color="black", linewidth=2,
               label="owned by some task (after task i)")
        if hat.capacity:
            usage = [100 * hat.capacity["usage"][str(t)] for t in range(len(x))]
            b.bar(x, usage, color="#4c72b0", alpha=0.6, label="used by task i (binary mask)")
        b.set_ylim(0, 100)
        b.legend(fontsize=7, loc="upper left")
    b.set_ylabel("HAT units (%)")
    b.set_title("HAT's capacity", fontsize=9)
    c.set_ylabel("train time per step (ms)")
    c.set_title("Cost of one training step", fontsize=9)
    d.set_ylabel("peak memory so far (MB)")
    d.set_title("Peak memory", fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("tasks learned")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    a.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
