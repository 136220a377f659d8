"""Global label image: one int32 value per nucleus at the working resolution.

Written as a chunked Zarr array (open it in napari, or score it with
``nucli evaluate``); attributes ``{"nucli": {"kind": "label-image",
"downsample": d, "working_mpp": m, ...}}`` say how to map it back to level-0
(level-0 px = (working px) * d). Value ``k`` is the nucleus with ``label == k``
in the measurements table; 0 is background.

Streaming: nuclei arrive row of tiles by row of tiles; a band of rows is held in
memory and whole chunk-rows are written once no later nucleus can reach them,
so memory is about (tile size + chunk) x slide width x 4 bytes. Rows no nucleus reaches are never
allocated or written (they are the array's fill value, 0), so a sparse 80k x 80k slide costs no more.
A failure while writing (a full disk) removes the temporary array: nothing partial is left, and an
existing output at the path is kept unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nucli.stitching import Sink
from nucli.export._atomic import hold, release, replace_dir, temp_dir_for

CHUNK = 512


class LabelImageSink(Sink):
    """Paints every nucleus into a label image: a Zarr array at ``path``, or a given array."""

    def __init__(self, path: Path | None = None, *, array: Any = None, chunk: int = CHUNK):
        if (path is None) == (array is None):
            raise ValueError("give exactly one of path or array")
        self.path = Path(path) if path is not None else None
        self.target = array
        self.chunk = int(chunk)
        self._tmp: Path | None = None
        self._lock: int | None = None
        self.count = 0

    def open(self, frame: Any) -> None:
        w, h = frame.working_size
        self.width, self.height = int(w), int(h)
        if self.path is not None:
            import zarr

            self._tmp = temp_dir_for(self.path)
            c = self.chunk
            try:  # a failure here (a full disk) happens before the stitch knows this sink is open
                self.target = zarr.create_array(store=str(self._tmp), shape=(self.height, self.width),
                                                chunks=(min(c, self.height), min(c, self.width)),
                                                dtype="int32", fill_value=0, zarr_format=3, overwrite=True)
                self.target.attrs["nucli"] = {
                    "kind": "label-image",
                    "downsample": float(frame.downsample),
                    "working_mpp": frame.um_per_px,
                    "level0_size": list(frame.level0_size),
                    "source_fingerprint": frame.fingerprint,
                    "method": frame.method,
                }
                self._lock = hold(self._tmp)  # being written: not a leftover for another run to remove
            except BaseException:
                self.abort()
                raise
        elif tuple(self.target.shape) != (self.height, self.width):
            raise ValueError(f"label array has shape {self.target.shape}, expected {(self.height, self.width)}")
        self._blocks: dict[tuple[int, int], np.ndarray] = {}  # (chunk row, chunk col) -> painted chunk
        self._y0 = 0  # rows above it are written

    def _block(self, by: int, bx: int) -> np.ndarray:
        block = self._blocks.get((by, bx))
        if block is None:
            c = self.chunk
            shape = (min(c, self.height - by * c), min(c, self.width - bx * c))
            block = self._blocks[(by, bx)] = np.zeros(shape, np.int32)
        return block

    def add(self, nucleus: Any) -> None:
        mask = nucleus.mask
        y0, x0 = int(nucleus.y0), int(nucleus.x0)
        y1, x1 = y0 + mask.shape[0], x0 + mask.shape[1]
        if y0 < self._y0:
            raise RuntimeError(f"nucleus at row {y0} arrived after rows < {self._y0} were written")
        c = self.chunk
        for by in range(y0 // c, (y1 - 1) // c + 1):
            for bx in range(x0 // c, (x1 - 1) // c + 1):
                ya, yb = max(y0, by * c), min(y1, (by + 1) * c)
                xa, xb = max(x0, bx * c), min(x1, (bx + 1) * c)
                sub = mask[ya - y0 : yb - y0, xa - x0 : xb - x0]
                if sub.any():
                    region = self._block(by, bx)[ya - by * c : yb - by * c, xa - bx * c : xb - bx * c]
                    region[sub] = nucleus.label
        self.count += 1

    def flush(self, y_final: float) -> None:
        """Write whole chunk-rows above ``y_final`` (no later nucleus reaches them)."""
        if y_final == float("inf"):
            return
        y = int(min(y_final, self.height)) // self.chunk * self.chunk
        self._write_until(y)

    def _write_until(self, y: int) -> None:
        """Write the painted chunks above row ``y`` (a chunk boundary or the height), one chunk at a time:
        memory holds only chunks that nuclei reached and that are not written yet; chunks no nucleus
        reached are the array's fill value (0) and are not written at all."""
        if y <= self._y0:
            return
        c = self.chunk
        written = set()
        for by, bx in sorted(k for k in self._blocks if min((k[0] + 1) * c, self.height) <= y):
            block = self._blocks.pop((by, bx))
            self.target[by * c : by * c + block.shape[0], bx * c : bx * c + block.shape[1]] = block
            written.add((by, bx))
        if self.path is None:  # a given array: clear the chunks no nucleus reached
            for ya in range(self._y0, y, c):
                for xa in range(0, self.width, c):
                    if (ya // c, xa // c) not in written:
                        yb, xb = min(ya + c, y), min(xa + c, self.width)
                        self.target[ya:yb, xa:xb] = np.zeros((yb - ya, xb - xa), np.int32)
        self._y0 = y

    def close(self) -> None:
        self._write_until(self.height)
        if self.path is not None and self._tmp is not None:
            replace_dir(self._tmp, self.path)
            self._tmp = None
        release(self._lock)
        self._lock = None

    def abort(self) -> None:
        if self._tmp is not None:
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        release(self._lock)
        self._lock = None


def read_label_image(path: Path) -> tuple[Any, dict[str, Any]]:
    """Open a label image written by :class:`LabelImageSink`: (zarr array, its nucli attrs)."""
    import zarr

    arr = zarr.open_array(store=str(path), mode="r")
    return arr, dict(arr.attrs.get("nucli") or {})
