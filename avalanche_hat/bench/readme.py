"""README's leaderboard tables, generated from the committed leaderboard JSONs.

Each table sits in README.md between two HTML comments, ``<!-- leaderboard:NAME -->`` and
``<!-- /leaderboard:NAME -->``, and is rebuilt from ``benchmarks/results/NAME.json``::

    python -m avalanche_hat.bench.readme            # rewrite the tables in README.md
    python -m avalanche_hat.bench.readme --check    # exit 1 if a table differs from its JSON

Reads JSON only: no torch, Avalanche or timm.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The boards README shows, in order: the JSON stem under benchmarks/results and a caption.
BOARDS = {
    "fmnist": "Split Fashion-MNIST, task-incremental (5 tasks of 2 classes)",
    "pfmnist": "Permuted Fashion-MNIST (10 tasks of 10 classes)",
    "fmnist_class": "Split Fashion-MNIST, class-incremental (no task labels at test time)",
}


def _cell(mean, std, signed: bool = False, exact_zero: bool = False) -> str:
    """Mean ± std in percent with two decimals, as the reports print them (``n/a`` for none); with
    ``exact_zero`` only an exact 0 prints as 0.00."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    value = 100 * mean
    if mean == 0.0:
        text = "0.00"
    else:
        rounds_to_zero = abs(value) < 0.005
        sign = "+" if signed or (exact_zero and rounds_to_zero) else ""
        text = f"{value:{sign}.2f}"
    if std is not None:
        text += f" ± {100 * std:.2f}"
    return text


def board_table(data: dict, report: str) -> str:
    """The short table of one leaderboard JSON: method, ACC, BWT (mean ± std over its seeds), HAT in
    bold, then one line with the seeds and a link to the full report."""
    rows = ["| method | ACC (%) | BWT (%) |", "|---|---:|---:|"]
    for row in data["leaderboard"]:
        name = f"**{row['method']}**" if row["method"] == "HAT" else row["method"]
        std = lambda k: row.get(f"{k}_std") if len(row["seeds"]) > 1 else None  # noqa: E731
        rows.append(f"| {name} | {_cell(row['acc_mean'], std('acc'))} | "
                    f"{_cell(row['bwt_mean'], std('bwt'), signed=True, exact_zero=True)} |")
    seeds = sorted({s for row in data["leaderboard"] for s in row["seeds"]})
    rows += ["", f"Seeds {', '.join(map(str, seeds))}; command and full report: [{report}]({report})."]
    return "\n".join(rows)


def tables(results: Path | None = None) -> dict[str, str]:
    """Every table of :data:`BOARDS` from ``results`` (default: the checkout's benchmarks/results)."""
    results = Path(results) if results is not None else ROOT / "benchmarks" / "results"
    out = {}
    for name in BOARDS:
        path = results / f"{name}.json"
        if path.exists():
            report = f"benchmarks/results/{name}.md"
            out[name] = board_table(json.loads(path.read_text()), report)
    return out


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- leaderboard:{name} -->", f"<!-- /leaderboard:{name} -->"


def _block(name: str) -> re.Pattern:
    start, end = (re.escape(m) for m in _markers(name))
    return re.compile(rf"{start}\n(.*?){end}", re.S)


def readme_blocks(text: str) -> dict[str, str]:
    """The generated tables found in README text, by name."""
    return {name: m.group(1).removesuffix("\n") for name in BOARDS if (m := _block(name).search(text))}


def render(text: str, generated: dict[str, str]) -> str:
    """README text with every marked table replaced by its generated one. Raises ValueError when a
    board with a JSON has no markers in the text."""
    for name, table in generated.items():
        pattern = _block(name)
        if not pattern.search(text):
            raise ValueError(f"README has no <!-- leaderboard:{name} --> ... <!-- /leaderboard:{name} --> markers")
        start, end = _markers(name)
        text = pattern.sub(lambda m: f"{start}\n{table}\n{end}", text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avalanche_hat.bench.readme", description=__doc__.split("\n")[0])
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = parser.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text()
    try:
        new = render(text, tables(Path(args.results)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{path}: the leaderboard tables differ from {args.results}/*.json; regenerate them with "
                  "python -m avalanche_hat.bench.readme", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    print(f"wrote the tables {', '.join(readme_blocks(new))} into {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
