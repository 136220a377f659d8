"""The one method interface every segmentation method implements.

A method turns a batch of RGB tiles at its working pixel size into per-tile
instance labels. It is split into a model step (``infer``: the part that runs a
network, batched) and a CPU step (``postprocess``: class maps -> instances) so
that a pipeline can post-process batch k while the model runs batch k+1. The
CLI, stitching and export never know which method ran.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MethodConfig:
    """Settings a method travels with (saved beside its weights).

    ``mpp`` is the working pixel size (µm/px) the method expects; slides are
    resampled to it. ``nucleus_diameter_px`` is the typical nucleus diameter at
    that pixel size; ``max_nucleus_diameter_px`` bounds what the method may
    return and sets the default tile overlap (overlap >= max diameter keeps
    every nucleus whole in the tile that owns it).
    """

    name: str
    mpp: float = 0.5
    nucleus_diameter_px: float = 16.0
    max_nucleus_diameter_px: int = 64
    tile_size: int = 512
    overlap: int = 64
    batch_size: int = 4
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass
class TileResult:
    """What a method returns for one tile."""

    labels: np.ndarray  # (H, W) int32, 0 = background, ids 1..n
    scores: dict[int, float] | None = None  # optional per-nucleus score by label id


class Method(ABC):
    """A segmentation method. Build once per worker; call on many batches."""

    config: MethodConfig
    #: autocast dtype on a GPU (torch.bfloat16/float16), set by the runner (nucli.parallel.device); None: float32
    amp_dtype: Any = None

    def __init__(self, config: MethodConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def infer(self, tiles: np.ndarray) -> Any:
        """Model step on ``tiles`` (B, H, W, 3) uint8 RGB. Default: identity."""
        return tiles

    @abstractmethod
    def postprocess(self, raw: Any) -> list[TileResult]:
        """CPU step: the output of :meth:`infer` -> one :class:`TileResult` per tile."""

    def postprocess_tiles(self, raw: Any, tiles: np.ndarray) -> list[TileResult]:
        """CPU step with the tiles at hand (a method whose post-processing looks at the pixels
        overrides this). Default: :meth:`postprocess`."""
        return self.postprocess(raw)

    def postprocess_resampled(self, raw: Any, rgb: np.ndarray) -> np.ndarray | None:
        """Instance labels at the size of ``rgb`` (H, W, 3) from the :meth:`infer` output of one
        image (batch of 1) that the network saw resized to its working scale: the maps are
        resampled to the image's own pixels before post-processing, so outlines are traced at
        the image's resolution rather than enlarged pixel by pixel. None: the method cannot (its
        labels are then resized nearest-neighbour)."""
        return None

    def segment(self, tiles: np.ndarray) -> list[TileResult]:
        """Tiles (B, H, W, 3) uint8 -> per-tile instance labels."""
        tiles = np.asarray(tiles)
        if tiles.ndim == 3:
            tiles = tiles[None]
        return self.postprocess_tiles(self.infer(tiles), tiles)

    def describe(self) -> dict[str, Any]:
        """Settings recorded in the run store (so a rerun with others is refused)."""
        return {"method": self.name, "config": self.config.to_dict()}
