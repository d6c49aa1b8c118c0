"""The orders in which examples reach the model: the resumable, length-bucketed training
order shared by all processes, and longest-first evaluation shares that repeat no question.
Each sampler works on example lengths alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DistributedSampler


def bucketed_order(order: list[int], lengths: Sequence[int], batch_size: int, bucket_batches: int,
                   generator: torch.Generator) -> list[int]:
    """Length-aware batches: `order` cut into runs of `bucket_batches` batches, each run
    sorted by length and cut into batches, then all batches shuffled. Batches hold examples
    of similar length (little padding) and still come in random order. A short last batch
    stays last, so the DataLoader's batches are exactly these."""
    run = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), run):
        chunk = sorted(order[start : start + run], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    last = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [i for batch in shuffled + last for i in batch]


class ResumableSampler(DistributedSampler):
    """A shuffle whose order is a function of (seed, epoch) alone, so a run resumed
    mid-epoch sees the rest of that epoch in the order a run never stopped would.

    Lightning calls `set_epoch` at each epoch start. The sampler keeps its own resume
    position (`state_dict`): the epoch and how many of its batches the steps took
    (`took_batch`, counted as each step takes one, not as the loader prefetches). A resumed
    sampler leaves the examples already trained out of its next iteration only. With
    `lengths` and `bucket_batches`, the order is length-bucketed (`bucketed_order`), still a
    function of (seed, epoch).

    Across `num_replicas` processes (DDP), each step takes the next `batch_size *
    num_replicas` examples of the one order and gives each process its `batch_size`, so
    the processes of a step get examples of similar length. The order is padded with its
    first examples to a multiple of `num_replicas`, so every process runs the same number
    of steps. It is a `DistributedSampler`, so Lightning uses it as it is.

    No batch holds a single example unless `batch_size` is 1: where the epoch's last step
    would give each process one example, each gets one more from the start of the epoch's
    order. A batch of one makes torch.compile specialise on size 1 and compile Unsloth's
    kernels again; on 2 x H200 that one step took 19.6 s, the other steps 0.38 s (PQA-L's
    450 training questions, batch 8 on each of 2 or 4 GPUs, end every epoch that way).
    """

    def __init__(self, size: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int = 1,
                 bucket_batches: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.size, self.seed = size, seed
        self.lengths, self.batch_size, self.bucket_batches = lengths, batch_size, bucket_batches
        self.epoch, self.skip = 0, 0
        self.taken = 0  # batches of this epoch the steps took

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.skip, self.taken = epoch, 0, 0

    def took_batch(self) -> None:
        self.taken += 1

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the order, and what the order depends on."""
        return {"epoch": self.epoch, "batches": self.taken, "seed": self.seed, "batch_size": self.batch_size,
                "size": self.size, "bucket_batches": self.bucket_batches, "processes": self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position. The position counts each process's batches; the
        order is one for all processes, so a resume on another number of processes starts
        after the same examples."""
        ours = {"seed": self.seed, "batch_size": self.batch_size, "size": self.size, "bucket_batches": self.bucket_batches}
        differs = [f"{k}: checkpoint {state[k]}, this run {v}" for k, v in ours.items() if state.get(k, v) != v]
        counts = {k: state.get(k) for k in ("epoch", "batches", "processes") if k in state or k != "processes"}
        differs += [f"{k} {v!r} is not a count" for k, v in counts.items()
                    if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if differs:
            raise ValueError("; ".join(differs))
        self.epoch, self.taken = state["epoch"], state["batches"]
        self.skip = state["batches"] * self.batch_size * state.get("processes", 1)

    def _padding(self) -> int:
        """Examples repeated at the end of each epoch: to a multiple of the processes, and one
        more each where the last batch would hold one example."""
        pad = -self.size % self.num_replicas  # every process the same number of steps
        if self.batch_size > 1 and (self.size + pad) % (self.batch_size * self.num_replicas) == self.num_replicas:
            pad += self.num_replicas
        return pad

    def __len__(self) -> int:
        return (self.size + self._padding()) // self.num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        step = self.batch_size * self.num_replicas
        if self.bucket_batches > 0 and self.lengths is not None:
            order = bucketed_order(order, self.lengths, step, self.bucket_batches, generator)
        order += [order[i % len(order)] for i in range(self._padding())] if order else []
        start, self.skip = self.skip, 0  # the padding comes from the whole epoch, resumed or not
        order = order[start:]
        if self.num_replicas == 1:
            return iter(order)
        mine = []
        for s in range(0, len(order), step):
            chunk = order[s : s + step]
            share = len(chunk) // self.num_replicas
            mine += chunk[self.rank * share : (self.rank + 1) * share]
        return iter(mine)


class LongestFirst(DistributedSampler):
    """Evaluation order: longest examples first. Each batch then holds examples of similar
    length (little padding), and the largest batch runs first, so a batch that does not fit
    in memory fails at once. Scores do not depend on the order; `predict` writes its files
    back in the data's order.

    Across `num_replicas` processes, batch k goes to process k mod `num_replicas` (question k
    when there are fewer batches than processes), and no question is repeated to even out
    the processes' shares (Lightning's default sampler would repeat some, which would count
    them twice in the metrics).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int = 1, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=False)
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if len(batches) >= num_replicas:
            self.order = [i for batch in batches[rank::num_replicas] for i in batch]
        else:  # fewer batches than processes: share the questions one by one
            self.order = order[rank::num_replicas]

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter(self.order)
