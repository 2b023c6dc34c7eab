"""What a converted model costs, and what export_task gives back.

Usage:  python benchmarks/convert_overhead.py [--models resnet18 ...] [--rounds 21] [--threads 1]
        [--clock process|wall] [--json out.json]

For each model: the original (timm or torchvision, pretrained=False) and ``avalanche_hat.convert``
of it, in one process. Training: the full step of task 1 after task 0 was learned (task 0 owns
about half of every layer's units: its embeddings are set to random signs), forward at a soft mask
scale, cross-entropy plus the HAT regulariser reusing the forward's masks, backward, SGD step;
against the original's forward, cross-entropy, backward, SGD step. Each round times one converted
and one original step back to back (order alternating), so load from other processes hits both
alike; the table gives the median of the per-round ratios. Inference (eval mode, no grad): the HAT
network with task 0's binary masks, ``export_task(net, 0)`` (dead units pruned or folded to
zeros) and the original; parameter counts of the three. By default one thread and the CPU time of
the process are measured (stable on a shared machine); the load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import timm
import torch
import torch.nn.functional as F
import torchvision

from avalanche_hat import HATConfig, convert, export_task, hat_regularization, mark_task_trained, recorded_masks
from avalanche_hat.network import hat_modules

NUM_CLASSES = 10
MASK_SCALE = 100.0
REG = 0.75
# name: (factory, batch, size)
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=NUM_CLASSES), 32, 32),
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=NUM_CLASSES), 16, 64),
    "mobilenetv3_small_100": (lambda: timm.create_model("mobilenetv3_small_100", num_classes=NUM_CLASSES), 16, 64),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=NUM_CLASSES), 16, 64),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=NUM_CLASSES), 8, 64),
    "vit_tiny_patch8_64": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=NUM_CLASSES, img_size=64,
                                                     patch_size=8), 16, 64),
}
CLOCKS = {"process": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def make(name: str, seed: int = 0):
    factory, batch, size = MODELS[name]
    torch.manual_seed(seed)
    plain = factory()
    net = convert(plain, HATConfig(num_tasks=5))
    with torch.no_grad():
        for _, layer in hat_modules(net):
            layer.mask_embedding[0].copy_(torch.randn_like(layer.mask_embedding[0]).sign())
    mark_task_trained(net, 0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    return plain, net, x, y


def train_step(model, x, y, hat: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        if hat:
            with recorded_masks() as masks:
                loss = F.cross_entropy(model(x, task_id=1, mask_scale=MASK_SCALE), y)
            loss = loss + REG * hat_regularization(model, 1, MASK_SCALE, recorded=masks)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def infer_step(model, x, **kwargs):
    def step():
        with torch.no_grad():
            model(x, **kwargs)

    return step


def timed(fn) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def paired(a, b, rounds: int, warmup: int = 2):
    """Median of a's and b's times (ms) and of the per-round ratios a / b."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for r in range(rounds):
        if r % 2 == 0:
            ta.append(timed(a))
            tb.append(timed(b))
        else:
            tb.append(timed(b))
            ta.append(timed(a))
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, statistics.median(x / y for x, y in zip(ta, tb))


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    global clock
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    from avalanche_hat.mechanism import fused

    kernels = fused.kernels() is not None
    print(f"threads {args.threads}, clock {args.clock}, rounds {args.rounds}, fused CPU kernels "
          f"{'on' if kernels else 'off'}, load average {os.getloadavg()[0]:.2f} at start")
    rows = []
    head = ("| model | input | train ms conv / orig | train ratio | infer ms HAT / export / orig | "
            "export vs HAT | export vs orig | params HAT / export / orig |")
    print(head)
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        plain, net, x, y = make(name)
        tc, to, ratio = paired(train_step(net, x, y, True), train_step(plain, x, y, False), args.rounds)
        net.eval()
        plain.eval()
        exported = export_task(net, 0)
        with torch.no_grad():
            err = (exported(x) - net(x, task_id=0)).abs().max().item()
        ih, ie, r_eh = paired(infer_step(exported, x), infer_step(net, x, task_id=0), args.rounds)  # export, HAT
        ie2, io, r_eo = paired(infer_step(exported, x), infer_step(plain, x), args.rounds)
        ih_net = ie  # the HAT network's time from the first pairing
        row = dict(model=name, input=list(x.shape), train_ms=(tc, to), train_ratio=ratio,
                   infer_ms=dict(hat=ih_net, export=ih, original=io), export_vs_hat=r_eh, export_vs_original=r_eo,
                   params=dict(hat=count(net), export=count(exported), original=count(plain)),
                   export_max_abs_diff=err, pruned_layers=len(exported.hat_export.pruned),
                   hat_layers=len(exported.hat_export))
        rows.append(row)
        print(f"| {name} | {'x'.join(map(str, x.shape))} | {tc:.1f} / {to:.1f} | {ratio:.3f} | "
              f"{ih_net:.2f} / {ih:.2f} / {io:.2f} | {r_eh:.3f} | {r_eo:.3f} | "
              f"{count(net) / 1e6:.2f}M / {count(exported) / 1e6:.2f}M / {count(plain) / 1e6:.2f}M |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, threads=args.threads, clock=args.clock, rounds=args.rounds), f, indent=2)


if __name__ == "__main__":
    main()
