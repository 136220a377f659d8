"""Tile geometry (pure), tissue detection and the Zarr run store."""

from nucli.tiling.grid import TileGrid, axis_starts

__all__ = ["TileGrid", "axis_starts"]
