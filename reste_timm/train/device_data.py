"""A device-resident training loader for small image datasets (CIFAR, digits).

The whole split lives on the accelerator as uint8 (CIFAR-10 train: 150 MB), and the CIFAR recipe's
random crop (4-pixel zero padding) and horizontal flip run batched on the device, so a small network
is not bound by a CPU loader. Shuffling and augmentation draw from generators seeded by
``(seed, epoch, rank)``, so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from typing import Dict, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataSplits, decode_image

__all__ = ["DeviceImageLoader", "split_to_uint8"]


def split_to_uint8(split, image_column: str, label_column: str, size: int):
    """Decodes a ``datasets`` split into ``(N, 3, size, size)`` uint8 and ``(N,)`` int64 tensors."""
    images, labels = [], []
    for row in split:
        image = decode_image(row[image_column]).convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size))
        images.append(np.asarray(image, dtype=np.uint8))
        labels.append(int(row[label_column]))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long)


class DeviceImageLoader:
    """Batches of a device-resident split, with batched random crop and flip.

    Args:
        splits: The loaded splits (the train split is used).
        batch_size: Per-process batch size.
        device: Where the data lives and batches are made.
        mean: Normalisation mean (0-1 scale).
        std: Normalisation std.
        size: Image side.
        padding: Zero padding of the random crop.
        flip: Random horizontal flip.
        seed: Base seed.
        rank: This process's index.
        world_size: Number of processes; each takes an equal share of every epoch's permutation.
    """

    def __init__(self, splits: DataSplits, batch_size: int, device: torch.device, mean: Sequence[float],
                 std: Sequence[float], size: int = 32, padding: int = 4, flip: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        x, y = split_to_uint8(splits.train, splits.image_column, splits.label_column, size)
        self.images, self.labels = x.to(device), y.to(device)
        self.device = torch.device(device)
        self.batch_size, self.size, self.padding, self.flip = batch_size, size, padding, flip
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.per_rank = len(self.labels) // world_size
        self.epoch = 0
        self.skip = 0  # batches to skip on the next pass (mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def _generator(self, salt: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + salt)
        return g

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, p, s = x.shape[0], self.padding, self.size
        x = F.pad(x, (p, p, p, p))  # zeros, like torchvision's RandomCrop(padding=4) before ToTensor
        oy = torch.randint(0, 2 * p + 1, (n, 1), device=self.device, generator=g)
        ox = torch.randint(0, 2 * p + 1, (n, 1), device=self.device, generator=g)
        ar = torch.arange(s, device=self.device)
        rows, cols = (oy + ar)[:, :, None], (ox + ar)[:, None, :]
        x = x[torch.arange(n, device=self.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        if self.flip:
            flip = torch.rand(n, device=self.device, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        perm = torch.randperm(len(self.labels), device=self.device, generator=self._generator(0))
        mine = perm[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        skip, self.skip = self.skip, 0
        for b in range(skip, len(self)):
            idx = mine[b * self.batch_size:(b + 1) * self.batch_size]
            # One generator per batch: skipping batches on resume leaves the others' draws unchanged.
            g = self._generator((b + 1) * 65_537 + self.rank)
            x = self._augment(self.images[idx], g).float().sub_(self.mean).div_(self.std)
            yield {"pixel_values": x.contiguous(), "label": self.labels[idx],
                   "skipped": torch.zeros((), dtype=torch.long)}
