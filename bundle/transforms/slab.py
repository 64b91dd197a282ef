"""RandSlabd: draw a slab of k slices at a random separation from a volume (DiffusionBlend training)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from bundle.transforms.intensity import _source

__all__ = ["RandSlabd", "slab_span"]


def slab_span(slab_size: int, separation: int) -> int:
    """Slices spanned by a slab of ``slab_size`` slices ``separation`` apart."""
    return (slab_size - 1) * separation + 1


class RandSlabd(Randomizable, MapTransform):
    """Draw ``num_samples`` slabs ``{i, i+s, ..., i+(k-1)s}`` with a random separation s and start i.

    The input is a channel-first volume ``(1, X, Y, Z)``; each output item holds the slab as a
    ``(k, H, W) = (k, Y, X)`` tensor (the package's ``(Z, H, W)`` layout, docs/architecture.md)
    and the separation under ``label_key``. Separations that do not fit in the volume are not
    drawn; a volume too thin for any of them is an error that names its file.

    Args:
        keys: the image key(s) to cut slabs from (all cut at the same slices).
        slab_size: k, slices per slab.
        separations: the separations to draw from, uniformly.
        num_samples: slabs drawn per call (a list of dicts is returned, as MONAI's
            ``RandCropByPosNegLabeld`` does).
        label_key: where the separation is stored.
    """

    def __init__(
        self,
        keys: KeysCollection,
        slab_size: int = 3,
        separations: Sequence[int] = (1, 2, 3),
        num_samples: int = 1,
        label_key: str = "separation",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if slab_size < 1 or num_samples < 1 or not separations or min(separations) < 1:
            raise ValueError(f"invalid slab settings: slab_size={slab_size}, separations={separations}, num_samples={num_samples}")
        self.slab_size = int(slab_size)
        self.separations = tuple(int(s) for s in separations)
        self.num_samples = int(num_samples)
        self.label_key = label_key
        self._draws: list[tuple[int, int]] = []

    def randomize(self, depth: int) -> None:
        fitting = [s for s in self.separations if slab_span(self.slab_size, s) <= depth]
        self._draws = []
        for _ in range(self.num_samples):
            s = fitting[self.R.randint(len(fitting))]
            i = self.R.randint(depth - slab_span(self.slab_size, s) + 1)
            self._draws.append((s, i))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict]:
        d = dict(data)
        first = self.first_key(d)
        depth = d[first].shape[-1]
        need = slab_span(self.slab_size, min(self.separations))
        if depth < need:
            raise ValueError(
                f"{_source(d, first)}: {depth} axial slices, but a slab of {self.slab_size} slices needs at least {need}"
            )
        self.randomize(depth)
        out = []
        for s, i in self._draws:
            item = {k: v for k, v in d.items() if k not in self.keys}
            index = torch.arange(i, i + slab_span(self.slab_size, s), s)
            for key in self.key_iterator(d):
                vol = torch.as_tensor(d[key])
                item[key] = vol[0].index_select(-1, index.to(vol.device)).permute(2, 1, 0).contiguous().as_subclass(torch.Tensor)
            item[self.label_key] = torch.tensor(s, dtype=torch.long)
            out.append(item)
        return out

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandSlabd:
        super().set_random_state(seed, state)
        return self
