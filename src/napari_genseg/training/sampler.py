"""The training loop's sampler: an epoch's order as a pure function of (seed, epoch), sharded over
ranks, and able to start in the middle of an epoch (exact resume).

Like ``torch.utils.data.DistributedSampler`` (order = ``randperm`` with a generator seeded by
``seed + epoch``, every rank takes every ``world``-th index), plus ``start``: the number of this
rank's items of the epoch already consumed, so a resumed run sees exactly the batches an
uninterrupted one would have seen. It never draws from the global RNG.
"""

from __future__ import annotations

import torch

__all__ = ["EpochSampler"]


class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices of ``n`` dataset items for one rank.

    Args:
        n: dataset length.
        world, rank: number of ranks and this one (1, 0 without DDP).
        seed: base seed; epoch ``e`` is shuffled with ``seed + e``.
        shuffle: False = dataset order.
    With ``world > 1`` the tail of the permutation is dropped so every rank gets
    ``n // world`` items (the ranks then run the same number of steps).
    """

    def __init__(self, n: int, world: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        self.n, self.world, self.rank, self.seed, self.shuffle = n, world, rank, seed, shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields epoch ``epoch`` from this rank's item ``start`` on."""
        self.epoch, self.start = int(epoch), int(start)

    @property
    def per_rank(self) -> int:
        """Items of one rank in a whole epoch."""
        return self.n // self.world if self.world > 1 else self.n

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return order[: self.per_rank * self.world][self.rank::self.world]

    def __iter__(self):
        return iter(self._order()[self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)
