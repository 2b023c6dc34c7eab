"""Reproduce the committed leaderboard in benchmarks/results/.

    python benchmarks/leaderboard.py                      # Split Fashion-MNIST, all methods, seed 0
    python benchmarks/leaderboard.py --seeds 0 1 2        # the committed table (3 seeds)
    python benchmarks/leaderboard.py --benchmark cifar10 --network alexnet --device cuda --epochs 20

Takes the options of ``avalanche-hat-bench`` (``--help``); writes to benchmarks/results/ unless
``--out`` is given.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from avalanche_hat.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", str(ROOT / "benchmarks" / "results")]
    raise SystemExit(main(argv))
