"""The leaderboard of HAT against Avalanche's strategies: data, strategies, runner, reports, plots.

Run it with ``avalanche-hat-bench`` (or ``python -m avalanche_hat.bench``); ``main(argv)`` is the
same command from Python.
"""
from .cli import main

__all__ = ["main"]
