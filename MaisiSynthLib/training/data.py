"""Training data: image/label cases, shape buckets, and per-step deterministic sampling.

Everything random in training derives from (seed, step, position in the global batch): which cases
form a step's global batch, where a VAE patch is cut, the noise and timestep of each sample. A
process of a torchrun job takes its slice of the global batch, so G processes with batch B see
exactly what one process with batch G·B sees, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ..cases import find_pairs
from ..errors import OptionError
from ..grid import spacing_of
from ..volumes import to_canonical

HU_RANGE = (-1000.0, 1000.0)  # images are scaled to [0, 1] over this range, as the official data prep


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, position, ...), stable across runs and machines."""
    value = 0x2545F4914F6CDD1D
    for part in parts:
        value = (value ^ (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & 0xFFFFFFFFFFFFFFFF
    return value & 0x7FFFFFFFFFFFFFFF


def name_key(name: str) -> int:
    """A stable integer from a case name, to seed what belongs to a case rather than to its position."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


@dataclass
class Case:
    name: str
    image: torch.Tensor  # (1, X, Y, Z) float32 in [0, 1], RAS-ordered
    labels: torch.Tensor  # (1, X, Y, Z) int64 MAISI ids
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[1:])


def load_case(name: str, image_path: Path, label_path: Path) -> Case:
    image = nib.load(str(image_path))
    label = nib.load(str(label_path))
    if image.shape != label.shape or not np.allclose(image.affine, label.affine, atol=1e-4):
        raise OptionError(f"case {name}: image and label grids differ", "write image and label on the same grid")
    hu, affine = to_canonical(np.asanyarray(image.dataobj).astype(np.float32), image.affine)
    lab, _ = to_canonical(np.asanyarray(label.dataobj).astype(np.int16), label.affine)
    scaled = np.clip((hu - HU_RANGE[0]) / (HU_RANGE[1] - HU_RANGE[0]), 0.0, 1.0)
    spacing = spacing_of(affine)
    return Case(
        name,
        torch.from_numpy(np.ascontiguousarray(scaled))[None],
        torch.from_numpy(lab.astype(np.int64))[None],
        spacing,
    )


def load_cases(cases: str | Path, size_multiple: int = 1) -> list[Case]:
    loaded = [load_case(*pair) for pair in find_pairs(cases)]
    bad = [c.name for c in loaded if any(n % size_multiple for n in c.shape)]
    if bad:
        raise OptionError(
            f"case(s) {', '.join(bad[:5])} have sizes that are not multiples of {size_multiple}",
            "resample the cases to allowed sizes",
        )
    return loaded


class BucketSampler:
    """Global batches from shape buckets: each step draws one bucket (in proportion to its size) and
    `global_batch` of its cases, so every batch stacks and every process of a step sees one shape."""

    def __init__(self, shapes: list[tuple[int, ...]], global_batch: int, seed: int) -> None:
        self.buckets: dict[tuple[int, ...], list[int]] = {}
        for index, shape in enumerate(shapes):
            self.buckets.setdefault(tuple(shape), []).append(index)
        self.keys = sorted(self.buckets)
        self.global_batch = global_batch
        self.seed = seed

    def batch(self, step: int) -> list[int]:
        g = generator(self.seed, step, 0xB0C7)
        sizes = torch.tensor([len(self.buckets[k]) for k in self.keys], dtype=torch.float64)
        members = self.buckets[self.keys[int(torch.multinomial(sizes, 1, generator=g))]]
        if len(members) >= self.global_batch:
            picks = torch.randperm(len(members), generator=g)[: self.global_batch]
        else:
            picks = torch.randint(len(members), (self.global_batch,), generator=g)
        return [members[int(i)] for i in picks]

    def local(self, step: int, rank: int, per_rank: int) -> list[tuple[int, int]]:
        """(position in the global batch, case index) pairs of this rank's slice."""
        batch = self.batch(step)
        return [(p, batch[p]) for p in range(rank * per_rank, (rank + 1) * per_rank)]


def patch_origin(shape: tuple[int, ...], patch: tuple[int, ...], g: torch.Generator) -> tuple[int, ...]:
    return tuple(int(torch.randint(0, max(1, n - p + 1), (1,), generator=g)) for n, p in zip(shape, patch))


def origin_around(
    shape: tuple[int, ...], patch: tuple[int, ...], centre: tuple[int, ...], g: torch.Generator
) -> tuple[int, ...]:
    """A patch origin that puts `centre` inside the patch, up to a quarter patch off its middle, and
    the patch inside the volume where it fits."""
    origin = []
    for n, p, c in zip(shape, patch, centre):
        jitter = int(torch.randint(-(p // 4), p // 4 + 1, (1,), generator=g))
        origin.append(min(max(0, n - p), max(0, int(c) - p // 2 + jitter)))
    return tuple(origin)


def crop_patch(
    volume: torch.Tensor, origin: tuple[int, ...], patch: tuple[int, ...], fill: float = 0.0
) -> torch.Tensor:
    """A (C, *patch) crop at `origin`, padded with `fill` where the volume is smaller than the patch."""
    out = torch.full((volume.shape[0], *patch), fill, dtype=volume.dtype)
    src = tuple(slice(o, min(o + p, n)) for o, p, n in zip(origin, patch, volume.shape[1:]))
    dst = tuple(slice(0, s.stop - s.start) for s in src)
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out
