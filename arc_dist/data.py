"""The data position across restarts: a ``DistributedSampler`` that resumes exactly.

``ResumableDistributedSampler`` takes the arguments of ``torch.utils.data.DistributedSampler``
and yields the same indices in the same order. Its state is the *global* data position: the
epoch and how many samples of that epoch's order (shuffled with ``seed + epoch``, as the torch
sampler does) the ranks together have drawn. That is the same number on every rank, so it is
registered without ``per_rank``, and a job restarted at another world size continues from the
same position: no sample is repeated or dropped.

How it fits ``Arc``: a checkpoint written inside ``arc.step()`` holds the sampler's state as of
the previous ``step()`` call's return, i.e. before the batch in flight was drawn (controller.py),
so a resumed run trains on the batch that was in flight when the checkpoint was written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

log = logging.getLogger("arc_dist")


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` with ``state_dict``/``load_state_dict``; register it with ``Arc``.

    ::

        sampler = ResumableDistributedSampler(dataset, shuffle=True, seed=0)
        loader = DataLoader(dataset, batch_size=32, sampler=sampler)
        arc.register("sampler", sampler)          # not per_rank: the state is global
        arc.resume()
        for epoch in range(sampler.epoch, epochs):  # start at the resumed epoch
            sampler.set_epoch(epoch)
            for batch in loader:
                ...

    A loaded position applies to the next iteration over the sampler; later iterations start
    at the beginning of their epoch. ``set_epoch`` with another epoch discards a loaded position
    (with a warning), so start the epoch loop at ``sampler.epoch``. The position counts indices
    handed to the ``DataLoader``: with ``num_workers=0`` that is exactly what was trained on;
    worker processes prefetch ``num_workers * prefetch_factor`` batches, which a resume then
    skips (it never repeats them). Without an initialized process group it defaults to one
    replica (``DistributedSampler`` raises instead).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            num_replicas = 1 if num_replicas is None else num_replicas
            rank = 0 if rank is None else rank
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)
        self._start = 0  # where in the epoch's order the current (or last) pass began
        self._drawn = 0  # indices this rank yielded in that pass
        self._resume_at: int | None = None  # a loaded position, for the next pass

    def _order(self) -> list[int]:
        """The epoch's global order, before the ranks' shares are dealt."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        start = self._resume_at or 0
        self._resume_at = None
        self._start, self._drawn = start, 0
        order = self._order()
        rest = order[start:]
        world = self.num_replicas
        if self.drop_last:
            rest = rest[: len(rest) - len(rest) % world]
        elif len(rest) % world:
            # DistributedSampler's padding (from the head of the order); from position 0 the
            # indices are identical to its own
            pad = world - len(rest) % world
            rest += (order * math.ceil(pad / len(order)))[:pad]
        for index in rest[self.rank :: world]:
            self._drawn += 1
            yield index

    @property
    def position(self) -> int:
        """Samples of this epoch's order the ranks together have drawn (padding excluded)."""
        if self._resume_at is not None:
            return self._resume_at
        return min(self._start + self._drawn * self.num_replicas, len(self.dataset))  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            if self._resume_at:
                log.warning(
                    "arc_dist: ResumableDistributedSampler.set_epoch(%d) discards the resumed "
                    "position (epoch %d, %d samples drawn); start the epoch loop at "
                    "sampler.epoch to continue where the checkpoint left off",
                    epoch, self.epoch, self._resume_at,
                )  # fmt: skip
            self._start = self._drawn = 0
            self._resume_at = None
        super().set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_len": len(self.dataset),  # type: ignore[arg-type]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        have = {"seed": self.seed, "shuffle": self.shuffle, "dataset_len": len(self.dataset)}  # type: ignore[arg-type]
        differ = [f"{k}: saved {state[k]!r}, now {v!r}" for k, v in have.items() if state[k] != v]
        if differ:
            raise ValueError(
                "ResumableDistributedSampler: the checkpoint's data position belongs to another "
                f"data order ({'; '.join(differ)}). Fix: build the sampler with the dataset, seed "
                "and shuffle the run started with, or start a new run (a new checkpoint_dir)"
            )
        self.epoch = int(state["epoch"])
        self._resume_at = int(state["position"])
        self._start = self._drawn = 0
