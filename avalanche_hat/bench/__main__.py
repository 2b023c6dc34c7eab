"""``python -m avalanche_hat.bench``: the leaderboard command (see ``avalanche_hat.bench.cli``)."""
from .cli import main

raise SystemExit(main())
