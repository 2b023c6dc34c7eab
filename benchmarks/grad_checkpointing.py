"""What gradient checkpointing buys and costs: peak memory and time of one training step with
``set_grad_checkpointing(True)`` against without, for a HAT network and its plain timm twin, in one
process.

Usage:  python benchmarks/grad_checkpointing.py [--models hat_vit_tiny_patch16_224 ...] [--reps 5]

The HAT step is task 1's (task 0 learned, so Eq. 2 is active): forward at a soft mask scale inside
``recorded_masks()``, cross-entropy plus the regulariser, backward, SGD step; the plain step is the
same without HAT. Peak memory: the largest resident set above the step's starting point (the
``/proc`` high-water mark), in a process whose allocator returns large blocks at once
(``MALLOC_MMAP_THRESHOLD_``, set by re-running itself). Time: median CPU time of the process over
``--reps`` steps, one thread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import timm

from avalanche_hat import HATConfig, hat_regularization, mark_task_trained, recorded_masks
import avalanche_hat.timm_models  # noqa: F401  (registers the models)
from avalanche_hat.timm_models import PLAIN_TWINS

# (model, batch, image size, extra kwargs)
SETTINGS = {
    "hat_vit_tiny_patch16_224": (8, 224, {}),
    "hat_vit_base_patch16_224": (4, 224, {}),
    "hat_resnet18s": (32, 32, {}),
    "hat_resnet18": (16, 112, {}),
}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def step_fn(model, x, y, hat: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        if hat:
            with recorded_masks() as masks:
                out = model(x, task_id=1, mask_scale=100.0)
            loss = F.cross_entropy(out, y) + 0.75 * hat_regularization(model, 1, 100.0, recorded=masks)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def measure(step, reps: int) -> tuple[int, float]:
    step()  # optimizer state and first-touch allocations
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark
    step()
    peak = _status("VmHWM") - before
    times = []
    for _ in range(reps):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return peak, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["hat_vit_tiny_patch16_224", "hat_resnet18s"],
                        choices=sorted(SETTINGS))
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # large blocks back to the system at once
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    torch.set_num_threads(1)
    print(f"{'model':28} {'net':6} {'ckpt':5} {'peak MiB':>9} {'step s':>8} {'mem ratio':>9} {'time ratio':>10}")
    for name in args.models:
        batch, size, extra = SETTINGS[name]
        torch.manual_seed(0)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        hat = timm.create_model(name, hat_config=HATConfig(num_tasks=5), num_classes=10, **extra)
        mark_task_trained(hat, 0)
        plain = timm.create_model(PLAIN_TWINS[name], num_classes=10, **extra)
        for label, model, is_hat in (("hat", hat, True), ("plain", plain, False)):
            base = None
            for ckpt in (False, True):
                model.set_grad_checkpointing(ckpt)
                peak, t = measure(step_fn(model, x, y, is_hat), args.reps)
                base = base or (peak, t)
                print(f"{name:28} {label:6} {str(ckpt):5} {peak / 2**20:9.1f} {t:8.3f} "
                      f"{peak / base[0]:9.2f} {t / base[1]:10.2f}", flush=True)
            model.set_grad_checkpointing(False)


if __name__ == "__main__":
    main()
