"""HAT-CL Table 1: batches until the masks tell useful features from useless ones.

The paper (HAT-CL, Sec. 4.1) says only: "a simple network with five input features, only three of
which are useful. We consider a network to be properly trained when the attention masks reflect the
usefulness of the features. We counted the number of batches required to train the network and
repeated the process for 100 networks in each case." Original: 338.50 batches on average; HAT-CL:
25.00. Compared here, on the same 100 seeds (same data, targets and weights for both):

- original HAT: mask embeddings ~ N(0, 1), linear mask-scale schedule (Eq. 4) over each epoch;
- HAT-CL (ours): every embedding 1 ("dense"), cosine schedule (Eq. 6) over each epoch.

Both schedules come from the library (``LinearMaskScale``/``CosineMaskScale.at``). Every other
setting is shared; each choice and the reason for it (the paper states none of them):

- Network: one HAT gate per input feature, i.e. a depthwise 1x1 ``HATConv1d`` holding one weight
  and one mask unit per feature, summed, plus an output bias (a gated linear model). HAT masks the
  output units of a layer, so "masks that reflect the usefulness of the features" needs one masked
  unit per feature, and the paper's own argument (Sec. 4.1: a useful feature "initialized with a
  negative weight" gets its mask driven to zero) is about one weight per feature and its mask. A
  learnable read-out after the gate (``--readout linear|mlp``) turns each feature's weight into a
  product of two weights with a saddle at 0; screened, see below.
- Target: regression, y = x[:, :3] @ coef with |coef| in [1, 2] and random signs, MSE loss; x ~ N(0, 1).
  A logistic-loss classification target (``--task classification``) was screened: with the
  original's regulariser coefficient every mask of both strategies goes off (the regulariser's
  constant push of c / 5 per unit beats the bounded logistic gradient), so no network is ever
  trained: not a usable setting.
- Data: a fixed training set of 1024 samples reshuffled every epoch, batch 64 (the original code's
  batch size), so an epoch is 16 batches. The epoch length is the schedule's unit (Eq. 4 and Eq. 6
  restart every epoch) and the paper does not give it; the original's count grows about in
  proportion to it (screen: 170 / 329 / 629 / 721 batches at 8 / 16 / 32 / 50 batches per epoch),
  HAT-CL's, where it succeeds, is the position of its first trough (about half an epoch). 1024 samples is our choice
  (a round training-set size) and it is also where the original's figure falls near the paper's:
  read the original's figure as "about 20 epochs", not as a check of the epoch length.
- Optimiser and HAT: plain SGD lr 0.05, s_max 400, regulariser coefficient c 0.75, embedding clamp 6,
  cosh clamp 50 (the original code's values). With one masked layer and one task the original's
  global usage ratio and HAT-CL's layer-wise Eq. 5 coincide except for the quota; a quota of 1/5
  gives identical counts (screen), so the original's ratio (no quota) is used.
- Criterion: the first batch after which the binary masks (e > 0) are on for exactly the three
  useful features. Requiring them to stay right for 5 batches in a row (``--hold 5``) changes no
  count (screen). A network never right within ``--max-batches`` counts as ``--max-batches``.

Screens (``--screen``, 30 networks each; record in results/table1_mask_init_screen.txt) vary one
setting at a time. They also show when HAT-CL loses a useful feature for good: when the weights are
not aligned before the first trough (lr 0.01, 8-batch epochs, a two-weight read-out, c = 2), the
regulariser switches a useful feature off; with an even number of batches per epoch the library's
sampling of Eq. 6 (p = b / (B - 1)) never comes near s = 0, so a switched-off unit keeps a mask of
~0, its weights never get a gradient again and the loss cannot switch it back on.
``--cosine-trough 1`` samples Eq. 6 at p = b / B instead (s = 0 mid-epoch for even B); it is a
proposal for the library, off by default.

    python benchmarks/table1_mask_init.py --networks 100      # the table (results/table1_mask_init.txt)
    python benchmarks/table1_mask_init.py --screen --networks 30 --record screen.jsonl
    python benchmarks/table1_mask_init.py --readout linear --dataset-size 3200 --networks 30
"""

import argparse
import statistics
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from avalanche_hat import HATConfig, HATPayload, hat_regularization
from avalanche_hat.mechanism import CosineMaskScale, LinearMaskScale
from avalanche_hat.modules import HATConv1d

FEATURES, USEFUL = 5, 3
TARGET = torch.tensor([True] * USEFUL + [False] * (FEATURES - USEFUL))
STRATEGIES = {
    "original": ("normal", LinearMaskScale, "Original (N(0,1) init, linear Eq. 4)"),
    "ours": ("dense", CosineMaskScale, "HAT-CL (dense init, cosine Eq. 6)"),
}


@dataclass(frozen=True)
class Setup:
    """Everything both strategies share (the comparison varies only the init and the schedule)."""

    readout: str = "sum"          # sum | linear | mlp
    hidden: int = 8               # width of the mlp read-out
    task: str = "regression"      # regression (MSE) | classification (logistic loss)
    batch_size: int = 64
    dataset_size: int = 1024      # fixed training set, reshuffled each epoch (0: fresh samples every batch)
    batches_per_epoch: int = 0    # 0: one pass over the training set (dataset_size // batch_size)
    lr: float = 0.05
    reg: float = 0.75
    regularization: str = "global"  # global (original HAT) | layerwise (HAT-CL Eq. 5)
    quota: float = 0.0            # layerwise only
    s_max: float = 400.0
    hold: int = 1                 # consecutive batches the masks must stay right
    cosine_trough: bool = False   # sample Eq. 6 at p = b / B (reaches s = 0 mid-epoch for even B), not the library's b / (B - 1)


DEFAULT = Setup()


class GatedNet(nn.Module):
    """A HAT gate per input feature (depthwise 1x1 HATConv1d), then a read-out."""

    def __init__(self, cfg: HATConfig, setup: Setup):
        super().__init__()
        self.readout_kind = setup.readout
        if setup.readout == "sum":
            # one weight per feature, gated, summed, plus an output bias: a gated linear model
            self.gate = HATConv1d(FEATURES, FEATURES, 1, cfg, groups=FEATURES, bias=False)
            self.bias = nn.Parameter(torch.zeros(1))
        else:
            self.gate = HATConv1d(FEATURES, FEATURES, 1, cfg, groups=FEATURES)
            if setup.readout == "linear":
                self.readout = nn.Linear(FEATURES, 1)
            elif setup.readout == "mlp":
                self.readout = nn.Sequential(nn.Linear(FEATURES, setup.hidden), nn.ReLU(), nn.Linear(setup.hidden, 1))
            else:
                raise ValueError(f"unknown read-out {setup.readout!r}")

    def forward(self, x, mask_scale):
        h = self.gate(HATPayload(x.unsqueeze(-1), task_id=0, mask_scale=mask_scale)).data.squeeze(-1)
        if self.readout_kind == "sum":
            return h.sum(-1) + self.bias
        return self.readout(h).squeeze(-1)


def epoch_length(setup: Setup) -> int:
    """Batches per unit of the mask-scale schedule (an epoch)."""
    if setup.batches_per_epoch:
        if setup.dataset_size and setup.batches_per_epoch * setup.batch_size > setup.dataset_size:
            raise ValueError("batches_per_epoch * batch_size exceeds the training set: change dataset_size instead")
        return setup.batches_per_epoch
    if not setup.dataset_size:
        raise ValueError("give batches_per_epoch when samples are drawn fresh (dataset_size=0)")
    return max(1, setup.dataset_size // setup.batch_size)


def batches_to_train(strategy: str, seed: int, *, max_batches: int = 2000, setup: Setup = DEFAULT, trace: list | None = None,
                     **overrides) -> int:
    """Batches until the binary mask marks exactly the useful features (``max_batches`` if never).

    ``trace``: if a list, one dict per batch is appended to it (scale, embeddings, gate weights, loss)."""
    setup = replace(setup, **overrides)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    init, schedule_cls, _ = STRATEGIES[strategy]
    schedule = schedule_cls(setup.s_max)
    cfg = HATConfig(num_tasks=1, max_mask_scale=setup.s_max, mask_init=init)
    net = GatedNet(cfg, setup)
    coef = torch.randn(USEFUL, generator=g).sign() * (1 + torch.rand(USEFUL, generator=g))
    opt = torch.optim.SGD(net.parameters(), lr=setup.lr)
    quota = setup.quota if setup.regularization == "layerwise" else None
    epoch = epoch_length(setup)
    data = torch.randn(setup.dataset_size, FEATURES, generator=g) if setup.dataset_size else None
    streak = 0
    for b in range(max_batches):
        if data is None:
            x = torch.randn(setup.batch_size, FEATURES, generator=g)
        else:
            if b % epoch == 0:
                order = torch.randperm(setup.dataset_size, generator=g)
            x = data[order[(b % epoch) * setup.batch_size:(b % epoch + 1) * setup.batch_size]]
        z = x[:, :USEFUL] @ coef
        if setup.cosine_trough and strategy == "ours":
            s = schedule((b % epoch) / epoch)
        else:
            s = schedule.at(b % epoch, epoch)
        out = net(x, s)
        if setup.task == "regression":
            loss = nn.functional.mse_loss(out, z)
        else:
            loss = nn.functional.binary_cross_entropy_with_logits(out, (z > 0).float())
        loss = loss + setup.reg * hat_regularization(net, 0, s, kind=setup.regularization, quota=quota)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if trace is not None:
            trace.append({"batch": b + 1, "scale": s, "loss": float(loss.detach()), "coef": coef.tolist(),
                          "embedding": net.gate.mask_embedding[0].tolist(),
                          "gate_weight": net.gate.weight.flatten().tolist(),
                          "readout_weight": (net.readout[0].weight if setup.readout == "mlp" else net.readout.weight).flatten().tolist()
                          if setup.readout != "sum" else None})
        if torch.equal(net.gate.binary_mask(0) > 0, TARGET):
            streak += 1
            if streak >= setup.hold:
                return b + 2 - setup.hold
        else:
            streak = 0
    return max_batches


def run(setup: Setup, networks: int, max_batches: int, first_seed: int = 0) -> dict:
    out = {}
    for strategy in STRATEGIES:
        counts = [batches_to_train(strategy, seed, max_batches=max_batches, setup=setup)
                  for seed in range(first_seed, first_seed + networks)]
        out[strategy] = {
            "mean": statistics.mean(counts),
            "median": statistics.median(counts),
            "never": sum(c >= max_batches for c in counts),
            "counts": counts,
        }
    return out


SCREENS = [
    ("chosen", {}),
    ("previous setup (linear read-out, fresh samples, bs 32, 50/epoch, layerwise q 1/5)",
     dict(readout="linear", dataset_size=0, batch_size=32, batches_per_epoch=50, regularization="layerwise", quota=0.2)),
    ("epoch 8 batches (512 samples)", dict(dataset_size=512)),
    ("epoch 32 batches (2048 samples)", dict(dataset_size=2048)),
    ("epoch 50 batches (3200 samples)", dict(dataset_size=3200)),
    ("fresh samples, 16 batches/epoch", dict(dataset_size=0, batches_per_epoch=16)),
    ("batch 32 (epoch 32 batches)", dict(batch_size=32)),
    ("batch 32, 512 samples (epoch 16)", dict(batch_size=32, dataset_size=512)),
    ("lr 0.01", dict(lr=0.01)),
    ("lr 0.1", dict(lr=0.1)),
    ("reg 0.25", dict(reg=0.25)),
    ("reg 2.0", dict(reg=2.0)),
    ("layerwise, quota 1/5", dict(regularization="layerwise", quota=0.2)),
    ("classification (logistic loss)", dict(task="classification")),
    ("linear read-out", dict(readout="linear")),
    ("mlp read-out (8 hidden)", dict(readout="mlp")),
    ("linear read-out, classification", dict(readout="linear", task="classification")),
    ("masks right for 5 batches in a row", dict(hold=5)),
    # the proposal for the library: sample the cosine's trough (changes HAT-CL's schedule only)
    ("cosine trough sampled (p = b/B)", dict(cosine_trough=True)),
    ("cosine trough, linear read-out", dict(cosine_trough=True, readout="linear")),
    ("cosine trough, mlp read-out", dict(cosine_trough=True, readout="mlp")),
    ("cosine trough, lr 0.01", dict(cosine_trough=True, lr=0.01)),
    ("cosine trough, epoch 8 batches", dict(cosine_trough=True, dataset_size=512)),
    ("cosine trough, reg 2.0", dict(cosine_trough=True, reg=2.0)),
]


def screen(networks: int, max_batches: int, record: str | None, only: list[int] | None = None) -> None:
    """Run the settings of SCREENS, ``networks`` networks each; one line of JSON per setting to ``record``."""
    import json

    print(f"{'#':>2} {'setting':<60} {'ours mean/median/never':>24} {'original mean/median/never':>28}")
    for i, (name, overrides) in enumerate(SCREENS):
        if only and i not in only:
            continue
        setup = replace(DEFAULT, **overrides)
        res = run(setup, networks, max_batches)
        cell = lambda r: f"{r['mean']:.1f}/{r['median']:.0f}/{r['never']}"
        print(f"{i:>2} {name:<60} {cell(res['ours']):>24} {cell(res['original']):>28}", flush=True)
        if record:
            with open(record, "a") as f:
                f.write(json.dumps({"setting": name, "setup": asdict(setup), "networks": networks,
                                    "max_batches": max_batches, **res}) + "\n")


def describe(setup: Setup, networks: int, max_batches: int) -> str:
    read = {"sum": "one gated weight per feature, summed + bias", "linear": "gate (weight + bias per feature) then Linear(5, 1)",
            "mlp": f"gate (weight + bias per feature) then Linear(5, {setup.hidden})-ReLU-Linear({setup.hidden}, 1)"}[setup.readout]
    data = (f"{setup.dataset_size} training samples reshuffled per epoch" if setup.dataset_size else "fresh samples every batch")
    loss = "MSE on y = x[:, :3] @ coef" if setup.task == "regression" else "logistic loss on 1[x[:, :3] @ coef > 0]"
    reg = ("original global usage ratio" if setup.regularization == "global"
           else f"layer-wise Eq. 5, quota {setup.quota:g}")
    return "\n".join([
        f"HAT-CL Table 1: {networks} networks per strategy (seeds 0..{networks - 1}, shared), 5 features x ~ N(0, 1), 3 useful",
        f"  network: depthwise 1x1 HATConv1d gate, {read}; {loss}",
        f"  data: {data}, batch {setup.batch_size}, {epoch_length(setup)} batches per epoch (the schedules' unit)",
        f"  SGD lr {setup.lr:g}; s_max {setup.s_max:g}; regulariser c {setup.reg:g} x {reg}; embedding clamp 6, cosh clamp 50",
        f"  trained = first batch after which the binary masks are on for exactly the 3 useful features"
        + (f" ({setup.hold} batches in a row)" if setup.hold > 1 else "") + f"; never within {max_batches} counts {max_batches}",
        "  only the init and the schedule differ" + (" (HAT-CL's cosine sampled at p = b / B)" if setup.cosine_trough else ""),
    ])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", type=int, default=100)
    parser.add_argument("--max-batches", type=int, default=2000)
    parser.add_argument("--first-seed", type=int, default=0)
    choices = {"readout": ("sum", "linear", "mlp"), "task": ("regression", "classification"),
               "regularization": ("global", "layerwise")}
    for field, value in asdict(DEFAULT).items():
        kind = (lambda v: bool(int(v))) if isinstance(value, bool) else type(value)
        parser.add_argument("--" + field.replace("_", "-"), type=kind, default=value, choices=choices.get(field),
                            help=f"default {value!r}" + (" (0/1)" if isinstance(value, bool) else ""))
    parser.add_argument("--show-counts", action="store_true")
    parser.add_argument("--screen", action="store_true", help="run every setting of SCREENS instead")
    parser.add_argument("--only", type=int, nargs="*", help="with --screen: these rows of SCREENS")
    parser.add_argument("--record", help="with --screen: append one JSON line per setting to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.screen:
        screen(args.networks, args.max_batches, args.record, args.only)
        return {}
    setup = Setup(**{f: getattr(args, f) for f in asdict(DEFAULT)})
    print(describe(setup, args.networks, args.max_batches))
    res = run(setup, args.networks, args.max_batches, args.first_seed)
    print(f"{'strategy':<36} {'avg batches':>12} {'median':>8} {'never (of ' + str(args.networks) + ')':>14}")
    for strategy, (_, _, label) in STRATEGIES.items():
        r = res[strategy]
        print(f"{label:<36} {r['mean']:12.2f} {r['median']:8.1f} {r['never']:14d}")
        if args.show_counts:
            print("  counts:", r["counts"])
    print("paper (HAT-CL Table 1): original 338.50, HAT-CL 25.00")
    return {k: v["mean"] for k, v in res.items()}


if __name__ == "__main__":
    main()
