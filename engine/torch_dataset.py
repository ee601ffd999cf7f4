"""make_loader's batches as a torch.utils.data.IterableDataset, for training
code written around a DataLoader.

    dataset = LoaderDataset(store, "highres_no_ela", batch_size=8, img_size=256)
    for batch in DataLoader(dataset, batch_size=None):   # or: for batch in dataset
        batch["image"], batch["mask"], batch["index"]

Each item is already a batch (the loader batches, reads and augments in its
own DALI worker processes), so the DataLoader must neither batch again
(`batch_size=None`) nor start workers of its own (`num_workers=0`, its
default). `set_epoch(e)` re-plans the next iteration as make_loader's Loader
does; `close()` (or a `with` block) stops the reader workers.
"""
from __future__ import annotations

import torch.utils.data

from engine.loader import Loader, make_loader


class LoaderDataset(torch.utils.data.IterableDataset):
    """The batches of `make_loader(store, member, **options)`, one epoch per
    iteration; `len()` is that epoch's number of batches."""

    def __init__(self, store, member, **options):
        self.loader: Loader = make_loader(store, member, **options)

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("LoaderDataset runs its own reader workers: use it with "
                               "DataLoader(dataset, batch_size=None) and num_workers=0")
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> "LoaderDataset":
        self.loader.set_epoch(epoch, start_batch)
        return self

    def close(self) -> None:
        self.loader.close()

    def __enter__(self) -> "LoaderDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
