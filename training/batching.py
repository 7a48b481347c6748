"""A deterministic, resumable stream of micro-batches.

Micro-batch ``i`` is a pure function of (dataset, batch size, seed, i): epoch ``i // per_epoch`` is a
permutation drawn from ``seed + epoch``, and ``i % per_epoch`` picks a slice of it. Resuming at
micro-batch ``i`` therefore replays exactly the data an uninterrupted run would have seen, with no
iterator state to save beyond one integer — as long as the dataset, batch size and seed are the
same, which resume checks against the checkpoint's config (training/checkpointing.py).

Training streams drop an epoch's incomplete tail (every micro-batch has ``batch_size`` items, so
the loss scale is the same in every step); held-out streams (``drop_last=False``) keep it, so an
evaluation sees every held-out example.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


class BatchStream:
    """Micro-batches of ``batch_size`` items, reshuffled every epoch.

    Args:
        dataset: Anything indexable with ``len`` (items are dicts of token lists).
        batch_size: Items per micro-batch.
        collate: Turns a list of items into a batch of tensors.
        seed: Base seed of the epoch permutations.
        shuffle: ``False`` keeps file order (validation).
        drop_last: Drop each epoch's incomplete last batch (training); ``False`` keeps it, smaller
            (evaluation: every example counts).
        name: The data's name for error messages (a file path).

    Raises:
        DataError: fewer examples than one full batch (with ``drop_last``) or none at all.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        batch_size: int,
        collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        name: str = "the dataset",
    ) -> None:
        from tunesmith.data.datasets import DataError

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(dataset) == 0 or (drop_last and len(dataset) < batch_size):
            raise DataError(f"{name} has {len(dataset)} usable example(s), fewer than batch_size={batch_size}: "
                            "lower batch_size or add examples")
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.shuffle = seed, shuffle
        self.per_epoch = len(dataset) // batch_size if drop_last else -(-len(dataset) // batch_size)
        self._order_epoch, self._order = -1, torch.arange(0)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(len(self.dataset), generator=g)
            else:
                self._order = torch.arange(len(self.dataset))
            self._order_epoch = epoch
        return self._order

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """The ``index``-th micro-batch of the whole run (epochs continue past the first)."""
        epoch, pos = divmod(index, self.per_epoch)
        order = self._epoch_order(epoch)[pos * self.batch_size : (pos + 1) * self.batch_size]
        return self.collate([self.dataset[int(i)] for i in order])
