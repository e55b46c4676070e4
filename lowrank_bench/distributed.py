"""Data parallel over processes: `torchrun --nproc_per_node=N -m lowrank_bench.train ...` (or N submitit tasks).

Every rank builds the same model from the same seed, draws the same global batch of `trainer.batch_size` examples
(a config means the same run whatever the number of processes) and computes on its contiguous share of it, its
loss weighted by that share. Before each optimiser step the gradients are summed over the ranks in one bucketed
all-reduce (with the step's loss riding along), so every rank applies the same update to the same parameters:
the gradient of the global batch's mean, as `DistributedDataParallel` computes it. We reduce explicitly rather
than wrap the model in DDP because a run changes which parameters train from stage to stage (retraining,
continual sequences) and the bi-level step takes gradients with `autograd.grad`, which DDP's hooks never see; the
cost is no overlap of communication with the backward pass, small for adapters (the gradients are the adapter's).
The bi-level step reduces v before its finite difference and the difference after it
(`hypergradient.hypergradient` with its `sum_`).

Rank 0 alone writes files, rows and checkpoints and shows progress.

Evaluation is sharded (`eval_batches`, `gather_shares`): a split is cut into batches of `eval_batch_size` exactly as
one process cuts it, each rank computes a contiguous run of those batches (the first ranks one more when they do
not divide), and the per-example results (predictions, generated tokens, per-batch loss sums) are gathered in
rank order, which is the split's order. Every rank then computes the metric on the whole split, each example
counted once (no padding examples, as DistributedSampler would add), and every batch is the batch one process
computes (the same rows, the same padding): the metric equals a single process's, and the ranks agree on every
decision taken from it (best step, divergence). Sharded: classification, NER, SFT loss and token accuracy, E2E
generation, strided perplexity. Left whole on every rank: the single-window perplexity (one forward pass) and the
multiple-choice evaluations after training.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lowrank_bench.console import console

BUCKET_ELEMENTS = 1 << 24  # elements per all-reduce: 64 MB of float32


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collective tensors live: the rank's GPU under NCCL, the CPU under gloo

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in a single process) ------------------------------------------------------------------
    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place: one flat all-reduce per dtype and bucket."""
        if not self.active:
            return
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        for group in by_kind.values():
            bucket, size = [], 0
            for t in group + [None]:
                if t is None or (bucket and size + t.numel() > BUCKET_ELEMENTS):
                    flat = torch.cat([b.reshape(-1) for b in bucket])
                    dist.all_reduce(flat)
                    offset = 0
                    for b in bucket:
                        b.copy_(flat[offset: offset + b.numel()].view_as(b))
                        offset += b.numel()
                    bucket, size = [], 0
                if t is not None:
                    bucket.append(t)
                    size += t.numel()

    def sum_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Sum the gradients of `params` over the ranks, and the step's loss with them; returns the summed loss.
        A parameter without a gradient has none on every rank (the ranks run the same graph) and keeps none, as
        in a single process (AdamW skips it)."""
        if not self.active:
            return loss
        total = loss.detach().reshape(1).clone()
        self.sum_([p.grad for p in params if p.grad is not None] + [total])
        return total[0]

    def any(self, flag: bool) -> bool:
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values of `tensors` on every rank, in place (what DDP does to a model it wraps): the ranks start
        equal even where an initialisation drew from an unseeded source."""
        if not self.active:
            return
        for t in tensors:
            dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # -- sharded evaluation ----------------------------------------------------------------------------------------
    def share(self, n: int) -> range:
        """This rank's contiguous part of n items, in order: the first n % world ranks take one more."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def gather_shares(self, mine: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank: for lists made over `share`'s ranges,
        the whole in its original order."""
        if not self.active:
            return list(mine)
        return [item for part in self.gather(list(mine)) for item in part]


SINGLE = DataParallel()
_current = SINGLE


def current() -> DataParallel:
    return _current


_evaluated = 0  # examples this process evaluated since `take_evaluated` last read it


def eval_batches(n: int, batch_size: int) -> list[range]:
    """The rows [0, n) cut in batches of `batch_size` as one process cuts them, and of those, this rank's
    contiguous share (all of them in one process); the rows are counted for `take_evaluated`."""
    global _evaluated
    batches = [range(first, min(first + batch_size, n)) for first in range(0, n, batch_size)]
    mine = [batches[i] for i in current().share(len(batches))]
    _evaluated += sum(len(b) for b in mine)
    return mine


def take_evaluated() -> int:
    """How many examples this process evaluated (`eval_batches`) since the last call; the count restarts."""
    global _evaluated
    count, _evaluated = _evaluated, 0
    return count


def launched_world() -> int:
    """How many processes the launcher started for this run: torchrun's WORLD_SIZE, or submitit's task count."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SUBMITIT_FOLDER" in os.environ:  # a submitit job; several tasks per job run one data-parallel run
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            return int(os.environ["WORLD_SIZE"])
    return 1


def init(device: str = "auto") -> DataParallel:
    """Join the process group the launcher set up (NCCL on GPUs, gloo on the CPU); a plain run is a group of one."""
    global _current
    if launched_world() <= 1:
        _current = SINGLE
        return _current
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = device != "cpu" and torch.cuda.is_available()
    where = f"cuda:{local_rank % torch.cuda.device_count()}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(torch.device(where))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    _current = DataParallel(dist.get_rank(), dist.get_world_size(), local_rank, where)
    console.quiet = not _current.is_main  # progress, evaluations and messages: rank 0's
    return _current


def shutdown() -> None:
    global _current
    if _current.active and dist.is_initialized():
        dist.destroy_process_group()
    console.quiet = False
    _current = SINGLE


def main_folder(run_dir: Path) -> Path:
    """Rank 0's run folder, on every rank. Hydra made one folder per process (its timestamps differ): the other
    ranks remove theirs when it holds nothing but Hydra's own files."""
    dp = current()
    chosen = Path(dp.broadcast(str(run_dir)))
    if chosen != run_dir and run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log"
                                                      for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
    return chosen
