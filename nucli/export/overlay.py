"""Overlay picture: a downsampled view of the slide with every nucleus (and cell) outlined.

Nuclei are outlined in green, or, with ``--positivity``, in the colour of their
class (QuPath's: Positive red, Negative blue, 1+ yellow, 2+ orange, 3+ red);
cell boundaries (``--objects cells``) in cyan.

Built in the same pass as the other exports: each tile's owned region is
shrunk into a canvas (longest side at most ``max_side`` px), then each nucleus'
polygon is drawn on top. Where no tile was stored (no tissue there) the canvas
shows the slide itself, washed out towards white so that the analysed area stands
out; when the slide cannot be read any more (moved, changed), that area is grey.
Meant for a person to glance at, not for measuring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nucli.stitching import Sink
from nucli.export._atomic import AtomicFile

MAX_SIDE = 4096
CONTOUR_RGB = (0, 255, 0)
CELL_RGB = (0, 200, 255)
NOT_TILED_RGB = (200, 200, 200)  # areas without a stored tile when the slide cannot be read
WASH = 0.5  # share of white mixed into the slide where no tile was analysed


def slide_background(frame: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """The slide of ``frame`` at canvas size ``shape`` (H, W), washed out; None if it cannot be read.

    The file must still be the slide the run was made from (same fingerprint).
    """
    import logging

    path = getattr(frame, "source_path", None)
    if not path or not Path(path).is_file():
        return None
    try:
        from PIL import Image

        from nucli.slide import open_slide

        with open_slide(path) as slide:
            if not slide.has_fingerprint(frame.fingerprint):
                return None
            thumb = slide.thumbnail(max(shape))
        h, w = shape
        # the working grid covers working_size * downsample level-0 px: crop/pad the thumbnail to match
        sx = thumb.shape[1] / (frame.level0_size[0] or 1)
        sy = thumb.shape[0] / (frame.level0_size[1] or 1)
        cw = max(1, round(frame.working_size[0] * frame.downsample * sx))
        ch = max(1, round(frame.working_size[1] * frame.downsample * sy))
        canvas = np.full((ch, cw, 3), 255, np.uint8)
        canvas[:min(ch, thumb.shape[0]), :min(cw, thumb.shape[1])] = thumb[:ch, :cw, :3]
        img = np.asarray(Image.fromarray(canvas).resize((w, h), Image.BILINEAR), np.float32)
        return np.round(img * (1.0 - WASH) + 255.0 * WASH).astype(np.uint8)
    except Exception as exc:  # noqa: BLE001 -- a picture for the eye; never fail an export over it
        logging.getLogger("nucli.export").debug("overlay: slide background unavailable (%s)", exc)
        return None


class OverlaySink(Sink):
    """Draws tiles and nucleus outlines into a PNG at ``path`` (atomic)."""

    def __init__(self, path: Path, max_side: int = MAX_SIDE, color: tuple[int, int, int] = CONTOUR_RGB):
        self.path = Path(path)
        self.max_side = int(max_side)
        self.color = np.array(color, np.uint8)
        self.count = 0

    def open(self, frame: Any) -> None:
        w, h = frame.working_size
        self.scale = min(1.0, self.max_side / float(max(w, h, 1)))  # canvas px per working px
        self.downsample = float(frame.downsample)
        shape = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
        bg = slide_background(frame, shape)
        self.canvas = bg if bg is not None else np.full((*shape, 3), NOT_TILED_RGB, np.uint8)

    def add_tile(self, view: Any) -> None:
        c0, r0, c1, r1 = view.core
        if c1 <= c0 or r1 <= r0:
            return
        ox, oy = view.origin
        s = self.scale
        ch, cw = self.canvas.shape[:2]
        X0, Y0 = min(round((ox + c0) * s), cw), min(round((oy + r0) * s), ch)
        X1, Y1 = min(round((ox + c1) * s), cw), min(round((oy + r1) * s), ch)
        if X1 <= X0 or Y1 <= Y0:
            return
        part = view.pixels[r0:r1, c0:c1, :3]
        if part.shape[:2] != (Y1 - Y0, X1 - X0):
            from skimage.transform import resize

            part = resize(part, (Y1 - Y0, X1 - X0), order=1, anti_aliasing=s < 1.0, preserve_range=True)
        self.canvas[Y0:Y1, X0:X1] = np.asarray(part).astype(np.uint8)

    def _draw(self, ring: Any, color: np.ndarray) -> None:
        k = self.scale / self.downsample  # canvas px per level-0 px
        xy = np.asarray(ring.coords) * k - 0.5  # pixel centres at integers
        rr, cc = outline_pixels(np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int),
                                self.canvas.shape[:2])
        self.canvas[rr, cc] = color

    def add(self, nucleus: Any) -> None:
        cell = getattr(nucleus, "cell", None)
        if cell is not None:
            for ring in [cell.exterior, *cell.interiors]:
                self._draw(ring, np.array(CELL_RGB, np.uint8))
        name = getattr(nucleus, "classification", None)
        if name:
            from nucli.export.positivity import CLASS_COLORS

            color = np.array(CLASS_COLORS[name], np.uint8)
        else:
            color = self.color
        self._draw(nucleus.polygon.exterior, color)
        self.count += 1

    def close(self) -> None:
        from PIL import Image

        f = AtomicFile(self.path, binary=True)
        try:
            from nucli.outputs import png_info

            Image.fromarray(self.canvas).save(f.handle, format="PNG", pnginfo=png_info())  # marked as nucli's
        except BaseException:
            f.discard()
            raise
        f.commit()



def outline_pixels(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels on the closed polyline through (rows, cols), clipped to ``shape``."""
    from skimage.draw import line

    rr_all, cc_all = [rows[:1]], [cols[:1]]
    for k in range(len(rows) - 1):
        rr, cc = line(int(rows[k]), int(cols[k]), int(rows[k + 1]), int(cols[k + 1]))
        rr_all.append(rr)
        cc_all.append(cc)
    rr, cc = np.concatenate(rr_all), np.concatenate(cc_all)
    inside = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
    return rr[inside], cc[inside]
