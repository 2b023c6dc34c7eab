"""Distributed HAT: ``torchrun`` and ``DistributedDataParallel`` (NCCL on GPUs, Gloo on CPUs).

Avalanche 0.6.0 shards data with ``DistributedSampler`` once a process group exists, but never wraps
the model in DDP, reshuffles the same order every epoch, shards evaluation too (padding the last
shard with repeated samples) and neither reduces metrics nor keeps loggers to one process. This
module supplies the rest for HAT. Usage, in a script started with
``torchrun --nproc_per_node=N script.py``::

    from avalanche_hat.training import HAT, init_distributed, destroy_distributed, is_main_process
    from avalanche_hat.training.distributed import maybe_load_checkpoint, save_checkpoint

    device = init_distributed()          # NCCL and cuda:LOCAL_RANK with GPUs, else Gloo on the CPU
    strategy = HAT(model=net, optimizer=..., num_classes=2, device=device, train_mb_size=64)
    strategy, start = maybe_load_checkpoint(strategy, "hat.ckpt")
    for experience in benchmark.train_stream[start:]:
        strategy.train(experience)                 # every rank: its shard of the data
        results = strategy.eval(benchmark.test_stream)  # every rank: the same numbers
        save_checkpoint(strategy, "hat.ckpt")      # written by rank 0
    destroy_distributed()

What happens on every rank (the :class:`DistributedHATPlugin`, which ``HAT`` adds by itself):

- the model is wrapped in DDP once, when training starts (every head and embedding exists by then).
  HAT's gradient nullification (Eq. 2) and compensation (Eq. 3) are part of autograd, so each rank's
  gradients are already HAT's before DDP averages them; owned weights get exactly 0 everywhere.
- Task-indexed copies (per-task heads and norms) of tasks other than the current one get no
  gradient. Instead of ``find_unused_parameters=True`` (a walk over the autograd graph every
  iteration), DDP is told to leave every task-indexed copy alone, and the copies that did get a
  gradient (the current task's) are averaged in one all-reduce after the backward pass.
- Training data: a ``DistributedSampler`` per experience, reshuffled every epoch from a seed rank 0
  draws; ``train_mb_size`` is per process (the global minibatch is ``N * train_mb_size``).
- BatchNorm running statistics are kept per rank while training (no broadcast in every forward)
  and averaged over the ranks at the end of each experience; a statistic equal on every rank
  (earlier tasks' copies) keeps its exact value, so earlier tasks stay bit-identical.
- Evaluation: every rank evaluates the whole stream with the single-process minibatches, so every
  rank reports the same numbers, equal to a single-process evaluation of the same model. Training
  metrics (epoch accuracy and loss) see the minibatches of every rank, gathered.
- Loggers run on rank 0 only; after each ``train`` call parameters and buffers (masks, ``hat_trained``,
  norm statistics) are checked to be bit-identical on all ranks.
"""
from __future__ import annotations

import datetime
import inspect
import os
import warnings
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from avalanche.benchmarks.utils.data_loader import (
    MultiDatasetDataLoader, SingleDatasetDataLoader, TaskBalancedDataLoader,
)
from avalanche.core import SupervisedPlugin
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..modules.base import TaskIndexedModule
from . import checkpoint as _checkpoint
from .plugin import unwrap_model

#: Environment variables torchrun sets for every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------- process group
def is_distributed() -> bool:
    """Whether this process belongs to an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that logs and writes files."""
    return get_rank() == 0


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` under NCCL, the CPU otherwise."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(backend: Optional[str] = None, timeout: Optional[datetime.timedelta] = None) -> torch.device:
    """Join the process group ``torchrun`` describes (its environment variables) and return this
    process's device. ``backend``: ``"nccl"`` when CUDA is available (one GPU per process,
    ``cuda:LOCAL_RANK``), ``"gloo"`` otherwise (CPU). Calling it again returns the device."""
    if is_distributed():
        return local_device()
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed cannot start: {', '.join(missing)} not set. Launch the script with "
            "torchrun, which sets them: torchrun --nproc_per_node=N your_script.py (N = GPUs, or "
            "processes on the CPU)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ["LOCAL_RANK"])
    kwargs = {} if timeout is None else {"timeout": timeout}
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend='nccl' needs CUDA, which is not available here: use backend='gloo' on the CPU")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this node has {count} visible GPU(s): start at most one "
                f"process per GPU (torchrun --nproc_per_node={count})"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = device  # binds NCCL (and barrier) to this GPU
        dist.init_process_group(backend, **kwargs)
        return device
    dist.init_process_group(backend, **kwargs)
    return torch.device("cpu")


def destroy_distributed() -> None:
    """Leave the process group (no-op in a single process)."""
    if is_distributed():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where tensors must be for the default group's collectives."""
    return local_device()


# -------------------------------------------------------------------------------- collectives
def _groups(tensors: Iterable[torch.Tensor]) -> dict:
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@torch.no_grad()
def _unflat_(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset: offset + n].view_as(t))
        offset += n


@torch.no_grad()
def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average ``tensors`` in place over the ranks (one all-reduce per dtype and device)."""
    world = get_world_size()
    for group in _groups(tensors).values():
        flat = _flat(group)
        dist.all_reduce(flat)
        _unflat_(flat.div_(world), group)


@torch.no_grad()
def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values."""
    for group in _groups(tensors).values():
        flat = _flat(group)
        dist.broadcast(flat, src=src)
        _unflat_(flat, group)


@torch.no_grad()
def average_differing_(tensors: Iterable[torch.Tensor]) -> None:
    """Floating-point ``tensors`` (norm statistics): each element that differs between ranks
    becomes the mean over the ranks; an element equal on every rank keeps its exact value."""
    world = get_world_size()
    for group in _groups(tensors).values():
        flat = _flat(group)
        high, low, total = flat.clone(), flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(total)
        _unflat_(torch.where(high == low, high, total.div_(world)), group)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as integers that MAX/MIN reductions accept (int32 or int64)."""
    t = t.detach().reshape(-1)
    if t.is_complex():
        t = torch.view_as_real(t).reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_floating_point() or t.dtype == torch.uint8:
        t = t.contiguous().view(_INT_OF_SIZE[t.element_size()])
    return t.to(torch.int64) if t.element_size() == 8 else t.to(torch.int32)


@torch.no_grad()
def differing_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors whose bits are not the same on every rank (collective: every rank gets
    the same list)."""
    groups: dict = {}
    for name, t in named:
        bits = _bits(t)
        groups.setdefault((bits.dtype, bits.device), []).append((name, bits))
    names = []
    for group in groups.values():
        flat = torch.cat([bits for _, bits in group])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        same = high == low
        offset = 0
        for name, bits in group:
            if not bool(same[offset: offset + bits.numel()].all()):
                names.append(name)
            offset += bits.numel()
    return sorted(names)


def _broadcast_int(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src=0)
    return int(t.item())


# ----------------------------------------------------------------------------------- the model
def task_indexed_state_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the parameters and buffers of task-indexed copies (per-task heads,
    norms, tokens): only the current task's copy is used while training a task."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, TaskIndexedModule):
            dot = f"{prefix}." if prefix else ""
            names += [dot + n for n, _ in module.named_parameters()]
            names += [dot + n for n, _ in module.named_buffers()]
    return names


def wrap_model(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> DistributedDataParallel:
    """``model`` (every head and embedding created) on ``device`` in a ``DistributedDataParallel``
    that leaves task-indexed copies to :func:`reduce_task_indexed_gradients_` (or finds unused
    parameters itself with ``find_unused_parameters=True``). Every rank then holds rank 0's
    parameters and buffers."""
    model = model.to(device)
    ignored = [] if find_unused_parameters else task_indexed_state_names(model)
    kwargs = {"find_unused_parameters": find_unused_parameters}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False  # norm statistics: averaged per experience instead
    else:
        kwargs["broadcast_buffers"] = False
    if device.type == "cuda":
        kwargs["device_ids"] = [device]
    # DDP reads this attribute at construction (its documented way to exclude state); it is removed
    # again so that nothing of it stays in the model, its checkpoints or its copies.
    model._ddp_params_and_buffers_to_ignore = ignored
    try:
        ddp = DistributedDataParallel(model, **kwargs)
    finally:
        del model._ddp_params_and_buffers_to_ignore
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    # DDP broadcast the rest; buffers are broadcast here too (older torch skips them without
    # broadcast_buffers).
    broadcast_([named[n] for n in ignored] + [b for _, b in model.named_buffers()])
    ddp.hat_ignored_parameters = [named[n] for n in ignored if isinstance(named[n], nn.Parameter)]
    return ddp


# ---------------------------------------------------------------------------------- the plugin
class DistributedHATPlugin(SupervisedPlugin, supports_distributed=True):
    """Data-parallel training of a HAT strategy under ``torchrun`` (see the module docstring).

    Inert in a single process, so a strategy that carries it runs, pickles and loads the same with
    or without a process group. ``HAT`` adds one by itself (``HAT(distributed=...)``); for another
    strategy with the :class:`HATPlugin`, list this plugin *after* it.

    Args:
        find_unused_parameters: let DDP find the parameters a task does not use in every iteration
            (needed only for a model with per-task parts that are not avalanche_hat task-indexed
            modules, e.g. an ``nn.ModuleList`` of heads).
        reduce_training_metrics: training metrics (accuracy, loss) see every rank's minibatch.
        check_consistency: after each ``train`` call, check that every parameter and buffer is
            bit-identical on all ranks (two all-reduces of the model's size).
        required: raise if there is no process group (``HAT(distributed=True)``).
    """

    def __init__(
        self,
        *,
        find_unused_parameters: bool = False,
        reduce_training_metrics: bool = True,
        check_consistency: bool = True,
        required: bool = False,
    ) -> None:
        super().__init__()
        self.find_unused_parameters = bool(find_unused_parameters)
        self.reduce_training_metrics = bool(reduce_training_metrics)
        self.check_consistency = bool(check_consistency)
        self.required = bool(required)
        self._reset_transient()

    def _reset_transient(self) -> None:
        self._sampler: Optional[DistributedSampler] = None
        self._epoch = 0
        self._in_training = False
        self._first_backward = False

    def _active(self) -> bool:
        if is_distributed():
            return True
        if self.required:
            raise RuntimeError(
                "distributed training was requested (HAT(distributed=True)) but there is no process "
                "group: start the script with torchrun --nproc_per_node=N and call "
                "avalanche_hat.training.init_distributed() before building the strategy"
            )
        return False

    # ---------------------------------------------------------------------------- set-up
    def before_training(self, strategy, **kwargs) -> None:
        if not self._active():
            return
        self._rank_zero_logging(strategy)
        strategy.model = self._wrapped(strategy)

    def _wrapped(self, strategy) -> DistributedDataParallel:
        model = strategy.model
        device = strategy.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl" and device.type != "cuda":
            raise RuntimeError(
                f"the NCCL backend communicates CUDA tensors but the strategy's device is {device}: pass "
                "device=init_distributed() (this rank's GPU) to the strategy"
            )
        if isinstance(model, DistributedDataParallel):
            if hasattr(model, "hat_ignored_parameters") or model.find_unused_parameters:
                return model  # ours, or the user's DDP that finds unused parameters itself
            per_task = task_indexed_state_names(model.module)
            if per_task:
                raise ValueError(
                    "the model is already wrapped in DistributedDataParallel without "
                    "find_unused_parameters, but it has per-task copies (heads, norms) that only their "
                    f"own task uses (e.g. {per_task[0]}), so DDP would wait for their gradients for "
                    "ever: pass the unwrapped model (the strategy wraps it under torchrun), or wrap it "
                    "with find_unused_parameters=True"
                )
            return model
        return wrap_model(model, device, self.find_unused_parameters)

    def _rank_zero_logging(self, strategy) -> None:
        """Loggers print and write files on rank 0 only (every rank still computes the metrics)."""
        evaluator = getattr(strategy, "evaluator", None)
        if evaluator is not None and not is_main_process():
            evaluator.loggers = []

    # -------------------------------------------------------------------------- training
    def before_training_exp(self, strategy, **kwargs) -> None:
        if not self._active():
            return
        self._in_training = True
        self._first_backward = True
        self._epoch = 0
        self._sampler = None
        loader = strategy.dataloader
        if type(loader) is TaskBalancedDataLoader and len(loader.datasets) > 1:
            return  # several tasks at once (not HAT): Avalanche's own sharded, task-balanced loader
        if type(loader) not in (TaskBalancedDataLoader, DataLoader):
            warnings.warn(
                f"{type(loader).__name__} was not made by Avalanche's make_train_dataloader: it is used "
                "as it is, and each rank sees the data it yields (shard it yourself)"
            )
            return
        new = self._train_loader(strategy, **kwargs)
        if len(new) != len(loader):
            raise RuntimeError(
                f"the sharded training loader has {len(new)} minibatches per epoch and Avalanche's "
                f"{len(loader)}, which the HATPlugin's mask-scale schedule has already counted: this "
                "Avalanche version shards data unlike DistributedSampler (avalanche-hat expects 0.6.0)"
            )
        strategy.dataloader = new

    def _train_loader(self, strategy, num_workers=0, shuffle=True, pin_memory=None, persistent_workers=False,
                      drop_last=False, **kwargs) -> DataLoader:
        """One shard of the experience per rank, the same order on no two epochs (a seed from rank 0)."""
        data = strategy.adapted_dataset
        seed = _broadcast_int(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        self._sampler = DistributedSampler(data, num_replicas=get_world_size(), rank=get_rank(), shuffle=shuffle,
                                           seed=seed, drop_last=drop_last)
        if pin_memory is None:
            pin_memory = strategy.device.type == "cuda"
        return DataLoader(
            data, batch_size=strategy.train_mb_size, sampler=self._sampler, num_workers=num_workers,
            pin_memory=pin_memory, persistent_workers=bool(persistent_workers) and num_workers > 0,
            drop_last=drop_last, collate_fn=getattr(data, "collate_fn", None),
        )

    def before_training_epoch(self, strategy, **kwargs) -> None:
        if self._sampler is not None:
            self._sampler.set_epoch(self._epoch)
        self._epoch += 1

    def after_backward(self, strategy, **kwargs) -> None:
        if not self._active():
            return
        model = strategy.model
        ignored = getattr(model, "hat_ignored_parameters", None)
        if self._first_backward:
            self._first_backward = False
            if isinstance(model, DistributedDataParallel):
                self._check_gradients(model, ignored or [])
        if ignored:
            reduce_task_indexed_gradients_(ignored)

    def _check_gradients(self, model: DistributedDataParallel, ignored: list[nn.Parameter]) -> None:
        """First iteration of each experience: DDP expects a gradient for every parameter it
        manages, and the task-indexed copies with a gradient must be the same on every rank."""
        if model.find_unused_parameters:
            return
        skip = {id(p) for p in ignored}
        missing = [n for n, p in model.module.named_parameters()
                   if p.requires_grad and id(p) not in skip and p.grad is None]
        if missing:
            raise RuntimeError(
                f"parameters {missing[:5]} got no gradient in this task, so DistributedDataParallel "
                "would wait for them: the model has per-task parts that are not avalanche_hat "
                "task-indexed modules. Use HAT(..., distributed=DistributedHATPlugin("
                "find_unused_parameters=True)) (or TaskIndexedLinear / TaskIndexed norms for them)"
            )
        present = torch.tensor([p.grad is not None for p in ignored], dtype=torch.int32, device=_comm_device())
        if present.numel():
            high, low = present.clone(), present.clone()
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            if not torch.equal(high, low):
                raise RuntimeError("ranks trained different task-indexed copies in the same step: every "
                                   "rank must train the same task at the same time")

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if self.reduce_training_metrics and self._active():
            gather_minibatch_for_metrics(strategy)

    def after_training_exp(self, strategy, **kwargs) -> None:
        if not self._active():
            return
        self._sync_statistics(strategy)
        self._in_training = False
        self._sampler = None

    def after_training(self, strategy, **kwargs) -> None:
        if self._active() and self.check_consistency:
            check_identical_across_ranks(unwrap_model(strategy.model))

    def _sync_statistics(self, strategy) -> None:
        model = unwrap_model(strategy.model)
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        average_differing_(buffers)

    # ------------------------------------------------------------------------------ eval
    def before_eval(self, strategy, **kwargs) -> None:
        if not self._active():
            return
        self._rank_zero_logging(strategy)
        if self._in_training:  # periodic evaluation inside training: every rank is here
            self._sync_statistics(strategy)

    def before_eval_exp(self, strategy, **kwargs) -> None:
        """Every rank evaluates the whole experience, in the minibatches of a single process."""
        if not self._active():
            return
        loader = strategy.dataloader
        if isinstance(loader, MultiDatasetDataLoader) and loader.distributed_sampling and len(loader.datasets) == 1:
            strategy.dataloader = SingleDatasetDataLoader(
                loader.datasets[0], loader.batch_sizes[0], distributed_sampling=False, **loader.loader_kwargs
            )

    # ----------------------------------------------------------------------- checkpoints
    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_sampler=None, _epoch=0, _in_training=False, _first_backward=False)
        return state


@torch.no_grad()
def reduce_task_indexed_gradients_(parameters: list[nn.Parameter]) -> None:
    """Average over the ranks the gradients of the task-indexed copies that have one (DDP leaves
    them alone: only the current task's copy is used)."""
    all_reduce_mean_([p.grad for p in parameters if p.grad is not None])


@torch.no_grad()
def gather_minibatch_for_metrics(strategy) -> None:
    """Replace the minibatch outputs, targets, task labels and loss by those of all ranks, for the
    metrics that read them after the iteration (``mb_x`` stays this rank's)."""
    out, mbatch = strategy.mb_output, strategy.mbatch
    if not isinstance(out, torch.Tensor) or not isinstance(mbatch, (list, tuple)) or len(mbatch) < 3:
        return
    y, t = mbatch[1], mbatch[-1]
    if not (isinstance(y, torch.Tensor) and isinstance(t, torch.Tensor)) or not len(y) == len(t) == len(out):
        return
    n = len(out)
    device = out.device if dist.get_backend() != "nccl" else _comm_device()
    loss = strategy.loss.detach().reshape(-1)[0] if isinstance(strategy.loss, torch.Tensor) else torch.tensor(0.0)
    head = torch.stack([torch.tensor(float(n), dtype=torch.float64, device=device), loss.to(device, torch.float64)])
    heads = [torch.empty_like(head) for _ in range(get_world_size())]
    dist.all_gather(heads, head)
    sizes = [int(h[0].item()) for h in heads]
    width = out[0].numel()
    rows = torch.cat([out.reshape(n, width).to(device, torch.float64), y.reshape(n, 1).to(device, torch.float64),
                      t.reshape(n, 1).to(device, torch.float64)], dim=1)
    padded = rows.new_zeros(max(sizes), width + 2)
    padded[:n] = rows
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    rows = torch.cat([g[:s] for g, s in zip(gathered, sizes)])
    total = sum(sizes)
    strategy.mb_output = rows[:, :width].to(out.device, out.dtype).reshape(total, *out.shape[1:])
    mbatch = list(mbatch)
    mbatch[1] = rows[:, width].to(y.device, y.dtype)
    mbatch[-1] = rows[:, width + 1].to(t.device, t.dtype)
    strategy.mbatch = mbatch
    mean_loss = sum(h[1] * s for h, s in zip(heads, sizes)) / total
    if isinstance(strategy.loss, torch.Tensor):
        strategy.loss = torch.full_like(strategy.loss.detach(), float(mean_loss))


def check_identical_across_ranks(model: nn.Module) -> None:
    """Raise unless every parameter and buffer of ``model`` is bit-identical on all ranks."""
    state = list(model.named_parameters()) + list(model.named_buffers())
    differing = differing_tensors(state)
    if differing:
        raise RuntimeError(
            f"ranks disagree on {len(differing)} tensor(s) after training (e.g. {differing[:5]}): "
            "every rank must apply the same updates. Something changed the model on some ranks only "
            "(a plugin or callback that runs on rank 0 only, or a different model per rank)"
        )


# --------------------------------------------------------------------------------- checkpoints
def save_checkpoint(strategy, fname, exclude=None) -> None:
    """Avalanche's checkpoint of ``strategy`` (see :mod:`.checkpoint`), written by rank 0 only, with
    the model outside its DDP wrapper, so that it loads in one process or in a distributed run.
    Other ranks wait until it is written; an error on rank 0 is raised on every rank."""
    error = None
    if is_main_process():
        model = strategy.model
        strategy.model = unwrap_model(model)
        try:
            _checkpoint.save_checkpoint(strategy, fname, exclude=exclude)
        except Exception as err:  # every rank must learn of it, or the others would wait for ever
            error = err
        finally:
            strategy.model = model
    if is_distributed():
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            raise RuntimeError(f"rank 0 could not save the checkpoint {fname}: {message[0]}")
    if error is not None:
        raise error


def maybe_load_checkpoint(strategy, fname, map_location=None, unique_objects=None):
    """Avalanche's ``maybe_load_checkpoint`` for a checkpoint saved in one process or by rank 0 of a
    distributed run: ``(strategy, index of the next experience)``. Tensors go to the strategy's
    device (each rank's own GPU) unless ``map_location`` says otherwise. Every rank must see the
    file (a shared file system); the strategy keeps its DistributedHATPlugin."""
    if map_location is None:
        map_location = strategy.device
    exists = os.path.exists(fname) if isinstance(fname, (str, os.PathLike)) else True
    if is_distributed():
        seen = [None] * get_world_size()
        dist.all_gather_object(seen, exists)
        if len(set(seen)) > 1:
            missing = [r for r, s in enumerate(seen) if not s]
            raise FileNotFoundError(
                f"checkpoint {fname} exists on some ranks but not on ranks {missing}: put it on a file "
                "system every node sees"
            )
    ours = [p for p in strategy.plugins if isinstance(p, DistributedHATPlugin)]
    strategy, start = _checkpoint.maybe_load_checkpoint(strategy, fname, map_location=map_location,
                                                       unique_objects=unique_objects)
    if ours and not any(isinstance(p, DistributedHATPlugin) for p in strategy.plugins):
        # A checkpoint of a strategy without the plugin: keep this run's, before the evaluator.
        plugins = strategy.plugins
        index = plugins.index(strategy.evaluator) if strategy.evaluator in plugins else len(plugins)
        plugins.insert(index, ours[0])
    return strategy, start
