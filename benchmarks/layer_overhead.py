"""Training-step cost of a HAT layer against its plain counterpart, as a ratio measured in one run.

Each case runs twice on the HAT side: as task 0 (nothing owned yet: the mask and its compensated
gradient are the whole cost) and as task 1 with half of every layer's units owned by task 0 (Eq. 2
on the weights as well). A step is forward, backward from a dense upstream gradient (as inside a
network) and dropping the gradients (``optimizer.zero_grad()``), on both sides.

    python benchmarks/layer_overhead.py [--rounds 301] [--steps 1] [--device cpu] [--threads 1] [--clock process]
                                        [--only Linear] [--pytorch-ops]

"extra ms" is the median of the paired differences: on the 16->16 layer, whose arithmetic is
nothing, it is HAT's fixed cost per step (``--only 16->16 --rounds 3001``).

On the CPU the HAT layers use avalanche_hat's fused kernels (built before timing); ``--pytorch-ops``
measures the PyTorch operations they replace (the path taken where the kernels cannot be built).

On a CPU shared with other jobs, time one thread by the CPU time of this process (the default):
with several threads OpenMP waits for busy cores and small operations look many times slower.
Plain and HAT steps alternate one by one (``--steps 1``) over many rounds, and the ratio is the
median of the per-round ratios: on a virtual machine whose speed drifts by 10-20% within a minute,
blocks of 5 steps over 31 rounds gave Linear ratios from 1.05 to 1.13 in six runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload, mark_task_trained
from avalanche_hat.mechanism import fused
from avalanche_hat.modules import HATConv2d, HATLinear, TaskIndexedBatchNorm2d, TaskIndexedLayerNorm


def cases(cfg: HATConfig, device):
    """(name, plain step, HAT step) triples; each step runs forward and backward once."""

    def linear():
        plain, hat = nn.Linear(1024, 1024), HATLinear(1024, 1024, cfg)
        x = torch.randn(128, 1024, device=device)
        return "Linear 1024->1024, batch 128", plain, hat, x, lambda m, x: m(x), lambda m, x: m(x).data

    def hidden_linear():  # inside a network: the input needs its gradient too (a third matrix product)
        plain, hat = nn.Linear(1024, 1024), HATLinear(1024, 1024, cfg)
        x = torch.randn(128, 1024, device=device, requires_grad=True)
        return "Linear 1024->1024, batch 128, input grad", plain, hat, x, lambda m, x: m(x), lambda m, x: m(x).data

    def mlp_linear():  # the first layer of the leaderboard's MLP, at its batch size
        plain, hat = nn.Linear(784, 400), HATLinear(784, 400, cfg)
        x = torch.randn(64, 784, device=device)
        return "Linear 784->400, batch 64", plain, hat, x, lambda m, x: m(x), lambda m, x: m(x).data

    def tiny_linear():  # almost no arithmetic: the difference of the two times is HAT's fixed cost per step
        plain, hat = nn.Linear(16, 16), HATLinear(16, 16, cfg)
        x = torch.randn(4, 16, device=device)
        return "Linear 16->16, batch 4 (fixed cost)", plain, hat, x, lambda m, x: m(x), lambda m, x: m(x).data

    def conv_bn():
        plain = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64))
        hat = nn.ModuleList([HATConv2d(64, 64, 3, cfg, padding=1, bias=False), TaskIndexedBatchNorm2d(64, cfg)])
        x = torch.randn(32, 64, 32, 32, device=device)
        return ("Conv2d 64->64 3x3 + BatchNorm2d, 32x32, batch 32", plain, hat, x,
                lambda m, x: m(x), lambda m, x: m[1](m[0](x)).data)

    def conv_relu():
        plain = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        hat = HATConv2d(64, 64, 3, cfg, padding=1)
        relu, pool = nn.ReLU(), nn.MaxPool2d(2)
        x = torch.randn(32, 64, 32, 32, device=device)
        return ("Conv2d 64->64 3x3 + ReLU + MaxPool, 32x32, batch 32", plain, hat, x,
                lambda m, x: m(x), lambda m, x: m(x).forward_by(relu).forward_by(pool).data)

    def linear_ln():
        plain = nn.Sequential(nn.Linear(192, 768), nn.LayerNorm(768))
        hat = nn.ModuleList([HATLinear(192, 768, cfg), TaskIndexedLayerNorm(768, cfg)])
        x = torch.randn(32, 197, 192, device=device)
        return ("Linear 192->768 + LayerNorm, 32x197 tokens", plain, hat, x,
                lambda m, x: m(x), lambda m, x: m[1](m[0](x)).data)

    return [linear(), hidden_linear(), mlp_linear(), tiny_linear(), conv_bn(), conv_relu(), linear_ln()]


def time_steps(fn, steps: int, device, clock=time.perf_counter) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (clock() - start) / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=301)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed block")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    parser.add_argument("--clock", choices=("process", "wall"), default="process")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    parser.add_argument("--pytorch-ops", action="store_true",
                        help="HAT layers without the fused CPU kernels (PyTorch operations only)")
    args = parser.parse_args(argv)
    if args.pytorch_ops:
        with fused.disabled():
            return run(args)
    fused.build()  # before timing: a first build takes 1.5 to 3 minutes (cached per environment)
    return run(args)


def run(args) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" and device.type == "cpu" else time.perf_counter
    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=2)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{'process' if clock is time.process_time else 'wall'} clock, median of {args.rounds} interleaved rounds, "
          f"fused CPU kernels {'in use' if fused.kernels() is not None else 'off'}")
    print(f"{'case':<55} {'HAT task':<22} {'plain ms':>9} {'HAT ms':>9} {'extra ms':>9} {'ratio':>7}")
    for name, plain, hat, x, run_plain, run_hat in cases(cfg, device):
        if args.only not in name:
            continue
        plain.to(device).train()
        hat.to(device).train()
        grad = torch.randn_like(run_plain(plain, x))  # a dense upstream gradient, as inside a network
        for task_id, label in ((0, "0 (nothing owned)"), (1, "1 (half owned by 0)")):
            if task_id == 1:
                with torch.no_grad():  # task 0 owns half of every HAT layer's units
                    for m in hat.modules():
                        if hasattr(m, "mask_embedding"):
                            m.mask_embedding[0, ::2] = -1.0
                mark_task_trained(hat, 0)
            payload = HATPayload(x, task_id=task_id, mask_scale=50.0)
            tp, th, ratios = measure(lambda: step(plain, run_plain(plain, x), grad, x),
                                     lambda: step(hat, run_hat(hat, payload), grad, x), args, device, clock)
            extra = statistics.median(b - a for a, b in zip(tp, th))  # median of the paired differences
            print(f"{name:<55} {label:<22} {1e3 * statistics.median(tp):9.3f} {1e3 * statistics.median(th):9.3f} "
                  f"{1e3 * extra:9.3f} {statistics.median(ratios):7.3f}")


def step(module: nn.Module, out: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> None:
    """Backward from ``out``, then drop the gradients as ``optimizer.zero_grad()`` does (and the
    input's, where it has one, as the layer below would consume it)."""
    out.backward(grad)
    for p in module.parameters():
        p.grad = None
    x.grad = None


def measure(step_plain, step_hat, args, device, clock):
    for _ in range(3):  # warm-up
        step_plain(), step_hat()
    tp, th, ratios = [], [], []
    for _ in range(args.rounds):
        a = time_steps(step_plain, args.steps, device, clock)
        b = time_steps(step_hat, args.steps, device, clock)
        tp.append(a), th.append(b), ratios.append(b / a)
    return tp, th, ratios


if __name__ == "__main__":
    main()
