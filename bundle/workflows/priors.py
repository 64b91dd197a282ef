"""The priors of the bundle as one value object: slab size -> network and weights file.

The slab prior (k > 1, ``network_def`` / ``ckpt_path``) serves the blending methods, the 2D prior
(k = 1, ``network_def_2d`` / ``ckpt_path_2d``) the slice-by-slice ones; classical methods need none.
Which prior a method needs is asked here (:meth:`Priors.for_method`), never re-derived.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from bundle.io import file_sha256
from bundle.networks import for_inference, load_weights
from bundle.recon.inferers import method_slab_size

__all__ = ["Prior", "Priors"]

_NULL = (None, "", "null", "None", "none")


@dataclasses.dataclass(frozen=True)
class Prior:
    """One prior: its slab size, its network, its weights file and the setting that names the file.

    Args:
        slab_size: k of the methods that use it.
        network: the (untrained) network; ``None``: not configured.
        ckpt_path: the weights file; ``None``: not configured.
        setting: the config setting of the weights (``ckpt_path`` or ``ckpt_path_2d``), for messages.
    """

    slab_size: int
    network: torch.nn.Module | None
    ckpt_path: Path | None
    setting: str

    def problem(self, method: str) -> str | None:
        """Why ``method`` cannot use this prior (no network, an empty weights setting, no weights file), or None."""
        k, setting = self.slab_size, self.setting
        if self.network is None:
            return f"method {method} needs a prior with slab_size={k}, but none is configured"
        if self.ckpt_path is None:
            return (
                f"{setting} is empty, but method {method} needs the trained weights of its slab_size={k} prior; "
                f"set {setting} to a weights file (models/ holds the shipped ones)"
            )
        if not self.ckpt_path.is_file():
            return f"{setting} {self.ckpt_path} does not exist (method {method} needs the weights of its slab_size={k} prior)"
        return None

    def check(self, method: str) -> None:
        """Refuse a prior that ``method`` cannot use, naming the setting to change.

        Raises:
            ValueError: :meth:`problem`'s reason.
        """
        reason = self.problem(method)
        if reason is not None:
            raise ValueError(reason)

    def load(self, device: torch.device | str, method: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The network with its weights, on ``device``, and the record of the weights (setting, path, SHA-256).

        Raises:
            ValueError: the prior cannot be used, the network has another slab size, or the file does not load.
        """
        self.check(method)
        assert self.network is not None and self.ckpt_path is not None
        own_k = getattr(self.network, "slab_size", self.slab_size)
        if own_k != self.slab_size:
            raise ValueError(f"the method needs a prior with slab_size={self.slab_size}, the configured one has {own_k}")
        load_weights(self.network, self.ckpt_path)
        record = {"setting": self.setting, "path": str(self.ckpt_path), "sha256": file_sha256(self.ckpt_path)}
        return for_inference(self.network, device), record


class Priors:
    """The slab prior and the 2D prior of the bundle.

    Args:
        network: the slab prior (``SlabDenoiser``, k > 1).
        ckpt_path: its weights.
        network_2d: the k = 1 prior of ``dds2d`` / ``mbir``.
        ckpt_path_2d: its weights.
    """

    def __init__(
        self,
        network: torch.nn.Module | None = None,
        ckpt_path: str | Path | None = None,
        network_2d: torch.nn.Module | None = None,
        ckpt_path_2d: str | Path | None = None,
    ) -> None:
        self.network, self.ckpt_path = network, None if ckpt_path in _NULL else Path(ckpt_path)  # type: ignore[arg-type]
        self.network_2d, self.ckpt_path_2d = network_2d, None if ckpt_path_2d in _NULL else Path(ckpt_path_2d)  # type: ignore[arg-type]

    def for_slab_size(self, slab_size: int | None) -> Prior | None:
        """The prior of slab size ``slab_size`` (the 2D one for 1); ``None`` for ``None`` (no prior needed)."""
        if slab_size is None:
            return None
        if int(slab_size) == 1:
            return Prior(1, self.network_2d, self.ckpt_path_2d, "ckpt_path_2d")
        return Prior(int(slab_size), self.network, self.ckpt_path, "ckpt_path")

    def for_method(self, method: str, slab_size: int = 3) -> Prior | None:
        """The prior that ``method`` (a name of ``bundle.recon.inferers.METHODS``) needs; ``None`` for classical methods."""
        return self.for_slab_size(method_slab_size(method, slab_size))

    def __repr__(self) -> str:
        return f"Priors(ckpt_path={self.ckpt_path!r}, ckpt_path_2d={self.ckpt_path_2d!r})"
