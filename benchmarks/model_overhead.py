"""What HAT costs: a training step and an inference step of each HAT network against its plain timm
twin, same batch, same input, same optimizer, in one process.

Usage:  python benchmarks/model_overhead.py [--models hat_resnet18s ...] [--reps 15] [--threads 1]
        [--clock process|wall] [--no-reg] [--keep-freed-memory] [--json out.json]

Each repetition times one HAT step and one plain step back to back (order alternating), so load
from other processes hits both alike; the table shows the median of the per-repetition ratios and
the median times. By default one thread and the CPU time of the process are measured: on a shared
machine that is what stays stable (with two threads, OpenMP waits for a busy core count as work).
The HAT training step is the full step of task 1 after task 0 was learned (so gradient
nullification is active): forward at a soft mask scale, cross-entropy plus the HAT regulariser
(``--no-reg`` leaves it out), backward, SGD step; the plain step is forward, cross-entropy,
backward, SGD step. Inference: eval mode, no grad, binary masks of task 0. Peak memory: the largest
resident set above the step's starting point during one training step, measured in a child process
whose allocator returns large blocks to the system at once (``MALLOC_MMAP_THRESHOLD_``), from the
``/proc`` high-water mark.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import timm

from avalanche_hat import HATConfig, hat_regularization, mark_task_trained, recorded_masks
import avalanche_hat.timm_models  # noqa: F401  (registers the models)
from avalanche_hat.timm_models import PLAIN_TWINS

# (model, batch, channels, size, extra create kwargs): batch 32 at 32x32 for the CIFAR networks; the
# 224 networks at 112x112 batch 16, and the ViT also at its native 224x224 (batch 8)
SETTINGS = [
    ("hat_resnet18s", 32, 3, 32, {}),
    ("hat_resnet34s", 32, 3, 32, {}),
    ("hat_alexnet", 32, 3, 32, {}),
    ("hat_mlp", 32, 1, 28, {}),
    ("hat_mlp", 256, 1, 28, {}),
    ("hat_resnet18", 16, 3, 112, {}),
    ("hat_resnet34", 16, 3, 112, {}),
    ("hat_vit_tiny_patch16_224", 16, 3, 112, {"img_size": 112}),
    ("hat_vit_tiny_patch16_224", 8, 3, 224, {}),
]
NUM_CLASSES = 10
MASK_SCALE = 100.0  # a soft mask scale, as in the middle of the cosine schedule
REG = 0.75
WITH_REG = True  # --no-reg: time the HAT step without the regulariser (what the layers alone cost)


def make_pair(setting, seed: int = 0):
    """The HAT network ready to train task 1 (task 0 learned: half of its units owned) and its plain twin."""
    name, batch, chans, size, extra = setting
    torch.manual_seed(seed)
    hat = timm.create_model(name, hat_config=HATConfig(num_tasks=5), num_classes=NUM_CLASSES, in_chans=chans, **extra)
    plain = timm.create_model(PLAIN_TWINS[name], num_classes=NUM_CLASSES, in_chans=chans, **extra)
    with torch.no_grad():
        for m in hat.modules():
            if hasattr(m, "mask_embedding"):
                m.mask_embedding[0].copy_(torch.randn_like(m.mask_embedding[0]).sign())
    mark_task_trained(hat, 0)
    x = torch.randn(batch, chans, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    return hat, plain, x, y


def train_step_fn(model, x, y, hat: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        if hat:  # as the HATPlugin does: the regulariser reuses the masks of the forward
            with recorded_masks() as masks:
                loss = F.cross_entropy(model(x, task_id=1, mask_scale=MASK_SCALE), y)
            if WITH_REG:
                loss = loss + REG * hat_regularization(model, 1, MASK_SCALE, recorded=masks)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def infer_step_fn(model, x, hat: bool):
    def step():
        model.eval()
        with torch.no_grad():
            return model(x, task_id=0) if hat else model(x)

    return step


CLOCKS = {"process": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def timed(fn) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def interleaved(hat_fn, plain_fn, reps: int, warmup: int):
    for _ in range(warmup):
        hat_fn()
        plain_fn()
    hat_t, plain_t = [], []
    for r in range(reps):
        if r % 2 == 0:
            h = timed(hat_fn)
            p = timed(plain_fn)
        else:
            p = timed(plain_fn)
            h = timed(hat_fn)
        hat_t.append(h)
        plain_t.append(p)
    ratio = statistics.median(h / p for h, p in zip(hat_t, plain_t))
    return statistics.median(hat_t) * 1e3, statistics.median(plain_t) * 1e3, ratio


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MiB in the heap (no dynamic mmap threshold, no trim),
    as caching allocators (jemalloc, tcmalloc) do: steps stop paying page faults for fresh memory."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except OSError:
        return False


# --------------------------------------------------------------------------------- memory
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_step_memory(fn) -> int:
    """Largest resident set above the starting point during ``fn()`` (bytes)."""
    fn()  # the first step allocates optimizer state; measure a steady-state step
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    fn()
    return _status("VmHWM") - before


def memory_child(indices) -> None:
    out = {}
    for i in indices:
        hat, plain, x, y = make_pair(SETTINGS[i])
        out[i] = {
            "hat": peak_step_memory(train_step_fn(hat, x, y, True)),
            "plain": peak_step_memory(train_step_fn(plain, x, y, False)),
        }
        del hat, plain
    print(json.dumps(out))


def measure_memory(indices, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--memory-child", "--threads", str(threads), "--only", *map(str, indices)]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}
    except (subprocess.CalledProcessError, OSError, ValueError) as e:
        print(f"peak memory not measured: {e}", file=sys.stderr)
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = sorted({s[0] for s in SETTINGS})
    parser.add_argument("--models", nargs="+", default=names, choices=names)
    parser.add_argument("--only", nargs="+", type=int, help=argparse.SUPPRESS)  # rows of SETTINGS
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine OpenMP waits for busy cores)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process",
                        help="process: CPU time of this process (robust to other load with 1 thread); wall")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-reg", action="store_true", help="leave the HAT regulariser out of the HAT step")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory (as jemalloc/tcmalloc would): no page faults per step")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from avalanche_hat.mechanism import fused

    print(f"fused CPU kernels {'in use' if fused.build() else 'off'} (built before timing; AVALANCHE_HAT_FUSED=0 "
          "measures the PyTorch operations)")
    global clock, WITH_REG
    clock = CLOCKS[args.clock]
    WITH_REG = not args.no_reg
    rows = args.only if args.only is not None else [i for i, s in enumerate(SETTINGS) if s[0] in args.models]
    if args.memory_child:
        memory_child(rows)
        return

    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("--keep-freed-memory needs glibc's mallopt")
    memory = {} if args.no_memory or args.no_reg else measure_memory(rows, args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} thread(s), {args.clock} clock, "
          f"load average {os.getloadavg()[0]:.1f}, {args.reps} interleaved "
          f"repetitions (median), HAT task 1 of 5 at mask scale {MASK_SCALE:g} with task 0 trained, "
          f"{'with' if WITH_REG else 'WITHOUT'} the regulariser"
          f"{', allocator keeps freed memory' if args.keep_freed_memory else ''}")
    header = (f"| {'model':<26} | {'input':<13} | {'train ms HAT':>12} | {'plain':>8} | {'ratio':>6} "
              f"| {'infer ms HAT':>12} | {'plain':>8} | {'ratio':>6} | {'peak MB HAT':>11} | {'plain':>7} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    results = []
    for i in rows:
        name, batch, chans, size, _ = SETTINGS[i]
        hat, plain, x, y = make_pair(SETTINGS[i])
        tr = interleaved(train_step_fn(hat, x, y, True), train_step_fn(plain, x, y, False), args.reps, args.warmup)
        inf = interleaved(infer_step_fn(hat, x, True), infer_step_fn(plain, x, False), args.reps, args.warmup)
        mem = memory.get(i, {})
        results.append(dict(model=name, plain=PLAIN_TWINS[name], batch=batch, input=[chans, size, size],
                             train_ms=[tr[0], tr[1]], train_ratio=tr[2], infer_ms=[inf[0], inf[1]],
                             infer_ratio=inf[2], peak_bytes=mem))
        mb = lambda k: f"{mem[k] / 2**20:.0f}" if k in mem else "-"  # noqa: E731
        print(f"| {name:<26} | {f'{batch}x{chans}x{size}x{size}':<13} | {tr[0]:>12.1f} | {tr[1]:>8.1f} | "
              f"{tr[2]:>5.3f}x | {inf[0]:>12.1f} | {inf[1]:>8.1f} | {inf[2]:>5.3f}x | {mb('hat'):>11} | "
              f"{mb('plain'):>7} |", flush=True)
        del hat, plain
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
