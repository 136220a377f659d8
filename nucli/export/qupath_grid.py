"""QuPath's 0.01 px coordinate grid.

QuPath rounds every vertex it reads to 0.01 px. nucli writes its polygons on
that grid already, and measures the polygon as written, so the polygon QuPath
holds is exactly the one nucli measured (no vertex moves, no area changes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

GRID = 0.01
DECIMALS = 2


def on_grid(values: Any, tol: float = 1e-6) -> bool:
    """Whether every number lies on the 0.01 grid."""
    v = np.asarray(values, np.float64) / GRID
    return bool(np.all(np.abs(v - np.round(v)) < tol))


def snap(poly: Any) -> Any:
    """``poly`` (a shapely Polygon) with every vertex rounded to 0.01 px; valid, or None if it collapses.

    Rounding alone keeps a nucleus or cell outline valid in practice (vertices are at least
    half a working pixel apart); when it does not, shapely's fixed-precision repair is used
    and the largest resulting polygon kept.
    """
    import shapely
    from shapely.geometry import Polygon
    from shapely.geometry.polygon import orient

    if poly is None or poly.is_empty:
        return None
    rounded = shapely.transform(poly, lambda c: np.round(c, DECIMALS))
    if not rounded.is_valid or rounded.geom_type != "Polygon":
        fixed = shapely.set_precision(poly, GRID)
        parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type == "Polygon" and g.area > 0]
        if not parts:
            return None
        rounded = shapely.transform(max(parts, key=lambda g: g.area), lambda c: np.round(c, DECIMALS))
        if not rounded.is_valid:
            return None
    if rounded.is_empty or rounded.area <= 0:
        return None
    return orient(Polygon(rounded.exterior, rounded.interiors), sign=1.0)


def ring_coords(ring: Any) -> list[list[float]]:
    """A ring as ``[[x, y], ...]`` with 2 decimals (closed)."""
    pts = [[round(float(x), DECIMALS), round(float(y), DECIMALS)] for x, y in ring.coords]
    if pts[0] != pts[-1]:
        pts.append(list(pts[0]))
    return pts


__all__ = ["GRID", "DECIMALS", "on_grid", "snap", "ring_coords"]
