"""Datasets for training the slab prior: checked datalists and a map-style dataset of random slabs."""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import load_decathlon_datalist
from monai.transforms import Randomizable
from monai.transforms.utils import apply_transform
from torch.utils.data import Dataset

__all__ = ["RandomStates", "SlabDataset", "load_datalist"]


def load_datalist(
    path: str | Path, key: str = "training", base_dir: str | Path | None = None, required: bool = True
) -> list[dict]:
    """Read a MONAI datalist JSON and check that every entry names an existing image.

    Args:
        path: the datalist JSON (MONAI/Decathlon format: ``{"training": [{"image": ...}, ...]}``).
        key: which list to read.
        base_dir: folder relative paths are resolved against (default: the JSON's folder).
        required: when False, a missing or empty list gives ``[]`` instead of an error.

    Returns:
        the entries with absolute ``image`` paths (a file, or a folder holding a DICOM series).

    Raises:
        FileNotFoundError: the datalist or one of its images does not exist (both are named).
        ValueError: the list is missing or empty, or an entry has no ``image``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"datalist {path} is not valid JSON: {err}") from err
    entries = raw.get(key) if isinstance(raw, dict) else None
    if not entries and not required:
        return []
    if not entries:
        raise ValueError(f"datalist {path} has no non-empty list '{key}'")
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("image"):
            raise ValueError(f"datalist {path}: entry {n} of '{key}' has no 'image': {entry!r}")
    items = load_decathlon_datalist(path, is_segmentation=False, data_list_key=key, base_dir=base_dir)
    for n, item in enumerate(items):
        if not Path(item["image"]).exists():
            raise FileNotFoundError(f"datalist {path}: entry {n} of '{key}' names {item['image']}, which does not exist")
    return items


class SlabDataset(Dataset):
    """Random slabs of every (cached) volume per epoch, as a map-style dataset, with per-volume weights.

    Map-style so that ``DistributedSampler`` shards it; the volumes are typically a MONAI
    ``CacheDataset`` holding them already resampled, so an epoch only cuts slabs.

    A volume contributes ``round(samples_per_volume * weight)`` items (at least one), where
    ``weight`` is the item's ``weight_key`` entry (1 when absent; the datalist sets it). Many
    small scans (e.g. 51 limb crops) can so add variety without swamping a few large volumes.

    Args:
        volumes: a sequence of preprocessed items (dicts).
        transform: the random slab transform (e.g. ``RandSlabd`` followed by augmentation);
            it may return one dict or a list with one dict.
        samples_per_volume: items drawn per epoch from a volume of weight 1.
        weight_key: the item entry holding the volume's sampling weight.
    """

    def __init__(
        self, volumes: Sequence[dict], transform: Callable, samples_per_volume: int = 1, weight_key: str = "weight"
    ) -> None:
        if samples_per_volume < 1:
            raise ValueError(f"samples_per_volume must be >= 1, got {samples_per_volume}")
        self.volumes = volumes
        self.transform = transform
        self.samples_per_volume = int(samples_per_volume)
        self.weight_key = weight_key
        counts = []
        for n in range(len(volumes)):
            weight = float(volumes[n].get(weight_key, 1.0)) if isinstance(volumes[n], dict) else 1.0
            if not weight > 0:
                raise ValueError(f"volume {n} has {weight_key}={weight}; sampling weights must be positive")
            counts.append(max(1, round(self.samples_per_volume * weight)))
        self.counts = counts
        self._ends = list(itertools.accumulate(counts))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"slab index {index} out of range for {len(self)} items")
        out = apply_transform(self.transform, self.volumes[bisect.bisect_right(self._ends, index)])
        if isinstance(out, list):
            if len(out) != 1:
                raise ValueError(f"the slab transform returned {len(out)} items; use num_samples=1 with SlabDataset")
            out = out[0]
        if isinstance(out, dict) and self.weight_key in out:  # a volume's weight is not part of its slabs
            out = {k: v for k, v in out.items() if k != self.weight_key}
        return out


class RandomStates:
    """The random state of training, as a checkpointable object (``state_dict`` / ``load_state_dict``).

    Holds torch's global generator and the NumPy generators of MONAI randomizable transforms,
    so that a run resumed from a checkpoint draws the same slabs, noise and timesteps as an
    uninterrupted one.

    Args:
        transforms: transforms whose ``Randomizable`` members are tracked, searched recursively
            through ``Compose`` and through the attributes of each randomizable transform (a
            dictionary transform such as ``RandAffined`` draws its parameters with the
            generator of the array transform it holds).
    """

    def __init__(self, transforms: Sequence[Any] = ()) -> None:
        self._randomizables: list[Randomizable] = []
        self._seen: set[int] = set()
        for t in transforms:
            self._collect(t)

    def _collect(self, t: Any) -> None:
        if id(t) in self._seen:
            return
        self._seen.add(id(t))
        if isinstance(t, Randomizable):
            self._randomizables.append(t)
            for value in vars(t).values():
                if isinstance(value, Randomizable):
                    self._collect(value)
        for child in getattr(t, "transforms", ()) or ():
            self._collect(child)

    def state_dict(self) -> dict:
        return {
            "torch": torch.get_rng_state(),
            "numpy": [torch.tensor(list(json.dumps(_np_state(r.R)).encode()), dtype=torch.uint8) for r in self._randomizables],
        }

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if len(state["numpy"]) != len(self._randomizables):
            raise ValueError(f"checkpoint holds {len(state['numpy'])} transform random states, the pipeline has {len(self._randomizables)}")
        for r, packed in zip(self._randomizables, state["numpy"]):
            name, keys, pos, has_gauss, cached = json.loads(bytes(packed.numpy()).decode())
            r.R.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _np_state(rs: np.random.RandomState) -> list:
    name, keys, pos, has_gauss, cached = rs.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
