"""The training batches of a stage: shuffled passes over its examples, as a resumable stream.

`BatchStream` yields exactly what `endless(DataLoader(examples, batch_size, shuffle=True, generator=g,
collate_fn=collate))` (tests/test_resume.py) yields, batch for batch, and draws exactly the same numbers from `g` at the same requests,
so that several streams sharing the run's one generator (the bi-level rule's lower and upper streams, stage after
stage) interleave their draws as the DataLoaders did. What a DataLoader with a RandomSampler draws from `g`
(torch 2.x, no workers; `torch/utils/data/dataloader.py` and `sampler.py`):

1. `iter(loader)`, at the first request of each pass: one int64 for the workers' base seed;
2. the first batch of the pass: `randperm(n)`;
3. RandomSampler then yields `randperm(n)[: num_samples % n]`, an empty slice of a second, discarded
   `randperm(n)`, drawn when the BatchSampler asks for an index after the n-th: while filling the last batch when
   that batch is short, or at the request after it when it is full (that request then opens the next pass).

`shuffle=False` serves every pass in the examples' own order and draws nothing (CURLoRA's notebooks:
`train_dataset[i:i+bs] for i in range(0, n, bs)` each epoch).

The stream's position is plain state (pass, the pass's permutation, examples served, whether the discarded
permutation was drawn), saved by a checkpoint and put back on resume.

Under data parallel every rank draws the same global batch of `batch_size` examples and collates its own
contiguous share of it; `share` (this rank's fraction of the global batch) weights its loss so that the sum over
ranks is the global batch's mean.
"""
from __future__ import annotations

from typing import Callable

import torch


class BatchStream:
    def __init__(self, examples: list[dict], batch_size: int, collate: Callable[[list[dict]], dict],
                 generator: torch.Generator, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.examples, self.batch_size, self.collate, self.generator = examples, int(batch_size), collate, generator
        self.shuffle = shuffle
        self.rank, self.world = rank, world
        self.epoch = 0
        self.order: torch.Tensor | None = None  # this pass's permutation; None until the pass's first request
        self.position = 0  # examples of this pass served so far
        self.tail_drawn = False  # whether the sampler drew its discarded end-of-pass permutation
        self.last_size = 0  # examples in the last global batch
        self.share = 1.0  # this rank's fraction of the last global batch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, dict]:
        n = len(self.examples)
        if self.order is not None and self.position >= n:  # the request after the pass's last batch ends the pass
            if not self.tail_drawn:
                self.draw_permutation()
            self.epoch, self.order = self.epoch + 1, None
        if self.order is None:
            if self.shuffle:
                torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the loader iterator's seed
            self.order = self.draw_permutation()
            self.position, self.tail_drawn = 0, False
        indices = self.order[self.position: self.position + self.batch_size].tolist()
        self.position += len(indices)
        if len(indices) < self.batch_size:  # the BatchSampler asked past the end while filling this batch
            self.draw_permutation()
            self.tail_drawn = True
        return self.epoch, self.collate([self.examples[i] for i in self.local(indices)])

    def draw_permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.examples))
        return torch.randperm(len(self.examples), generator=self.generator)

    def local(self, indices: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch. A rank left without examples (a global batch smaller than
        the number of ranks) computes on the batch's first example with weight zero."""
        self.last_size = len(indices)
        if self.world == 1:
            return indices
        start, end = bounds(len(indices), self.rank, self.world)
        self.share = (end - start) / len(indices)
        return indices[start:end] if end > start else indices[:1]

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        scalars = {"epoch": self.epoch, "position": self.position, "tail_drawn": self.tail_drawn,
                   "started": self.order is not None, "examples": len(self.examples)}
        return scalars, ({"order": self.order} if self.order is not None else {})

    def load_state(self, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
        if scalars["examples"] != len(self.examples):
            raise ValueError(f"the checkpoint's stream had {scalars['examples']} examples, this one has "
                             f"{len(self.examples)}")
        self.epoch, self.position, self.tail_drawn = scalars["epoch"], scalars["position"], scalars["tail_drawn"]
        self.order = tensors["order"].clone() if scalars["started"] else None


def bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's share of n items: contiguous, sizes differing by at most one, the larger first."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
