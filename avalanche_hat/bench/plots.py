"""Figures: the accuracy matrix of every method, HAT's capacity per task, the forgetting experiment."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_matrices(results, path: Path, title: str = "", vmin: float = 50.0) -> Path:
    """One heat map per method: row i = after training task i, column j = accuracy on task j (%).
    The cells of tasks not yet learned are greyed (their head is untrained). The colour scale starts
    at ``vmin`` (50: chance of a 2-class task; 0 for class-incremental accuracy)."""
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
        shown = np.ma.masked_array(m, mask=np.zeros_like(m, dtype=bool))
        if not joint:
            shown.mask = np.triu(np.ones_like(m, dtype=bool), k=1)  # tasks not learned yet
        ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=100, aspect="auto")
        ax.set_facecolor("#eeeeee")
        for i in range(m.shape[0]):
            for j in range(t):
                if joint or j <= i:
                    ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] < vmin + 0.6 * (100 - vmin) else "black")
        ax.set_xticks(range(t))
        ax.set_xticklabels([str(j) for j in range(t)], fontsize=7)
        ax.set_yticks(range(m.shape[0]))
        ax.set_yticklabels(["all"] if joint else [str(i) for i in range(m.shape[0])], fontsize=7)
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
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 1.2]})
    width = 0.8 / (len(layers) + 1)
    x = np.arange(len(tasks))
    for k, layer in enumerate(layers):
        ax.bar(x + k * width, [100 * layer["usage"][str(t)] for t in tasks], width,
               label=f"{layer['name']} ({layer['units']} units)")
    ax.bar(x + len(layers) * width, [100 * capacity["usage"][str(t)] for t in tasks], width, color="black",
           label="all layers (unit-weighted)")
    ax.set_xticks(x + width * len(layers) / 2)
    ax.set_xticklabels([f"task {t}" for t in tasks])
    ax.set_ylabel("units used by the task (%)")
    ax.set_ylim(0, 122)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=7, loc="upper center", ncol=min(3, len(layers) + 1), frameon=False)
    ax.set_title("Units each task's binary mask keeps", fontsize=9)
    owned = [100 * layer["owned"] for layer in layers] + [100 * capacity["owned"]]
    shared = [100 * layer["shared"] for layer in layers]
    names = [layer["name"] for layer in layers] + ["all"]
    y = np.arange(len(names))
    ax2.barh(y, owned, color="#4c72b0", label="used by >= 1 task")
    ax2.barh(y[:-1], shared, color="#dd8452", label="shared by >= 2 tasks")
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
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("HAT: forgetting one task leaves the others unchanged", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
