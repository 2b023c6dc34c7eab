"""Every script in examples/ runs in its fast mode and exits 0, so an example never rots.

Each example checks what it claims (bit-identical outputs, BWT = 0.0, ...) and exits non-zero when
that fails; here it runs as a subprocess with ``AVALANCHE_HAT_EXAMPLES_FAST=1``. A script whose
source holds the line ``# example-launch: torchrun ...`` is started with
``python -m torch.distributed.run`` and those arguments. The examples are single-threaded, so two
run at a time: the selected ones are all started by the first test that needs one.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT_S = 420  # one example, on a shared 2-core machine; each takes well under 60 s alone
LAUNCH = re.compile(r"^# example-launch: torchrun (.*)$", re.MULTILINE)


def command(script: Path) -> list[str]:
    launch = LAUNCH.search(script.read_text(encoding="utf-8"))
    if launch is None:
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "torch.distributed.run", *shlex.split(launch.group(1)), str(script)]


def run_example(script: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, AVALANCHE_HAT_EXAMPLES_FAST="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    try:
        return subprocess.run(command(script), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return subprocess.CompletedProcess(err.cmd, returncode=-1, stdout=out,
                                           stderr=f"timed out after {TIMEOUT_S} s")


@pytest.fixture(scope="module")
def started(request):
    """The selected examples, started two at a time; torchrun ones (two processes) run alone."""
    selected = [item.callspec.params["script"] for item in request.session.items
                if item.originalname == "test_example_runs_in_fast_mode_and_its_claims_hold"
                and hasattr(item, "callspec")]
    single = [s for s in selected if not LAUNCH.search(s.read_text(encoding="utf-8"))]
    multi = [s for s in selected if s not in single]
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {s: pool.submit(run_example, s) for s in single}
    solo = ThreadPoolExecutor(max_workers=1)
    others = list(futures.values())

    def after_the_others(script):
        for f in others:
            f.exception()  # wait, whatever the outcome
        return run_example(script)

    futures.update({s: solo.submit(after_the_others, s) for s in multi})
    yield futures
    pool.shutdown(cancel_futures=True)
    solo.shutdown(cancel_futures=True)


def test_there_are_examples():
    names = {s.name for s in EXAMPLES}
    assert {"avalanche_split_fmnist.py", "selective_forgetting.py", "class_incremental.py",
            "checkpoint_resume.py", "torchrun_cpu.py", "hatcl_port.py"} <= names, names


@pytest.mark.parametrize("script", EXAMPLES, ids=[s.stem for s in EXAMPLES])
def test_example_runs_in_fast_mode_and_its_claims_hold(script, started):
    done = started[script].result()
    assert done.returncode == 0, (
        f"{' '.join(command(script))} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}"
        f"\n--- stderr\n{done.stderr[-6000:]}"
    )
    assert done.stdout.strip(), "an example prints what it shows"
