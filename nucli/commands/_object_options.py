"""Options that say what each exported object is (nucleus or cell) and how it is classed (IHC positivity).

Shared by ``segment``, ``stitch`` and ``demo``; see docs/outputs.md.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer


class ObjectsKind(str, Enum):
    detections = "detections"
    cells = "cells"


class PositivityKind(str, Enum):
    dab = "dab"


Objects = Annotated[
    ObjectsKind,
    typer.Option("--objects", help="detections: one QuPath detection per nucleus; cells: QuPath cells, the nucleus "
                 "plus a boundary grown by --cell-expansion (never overlapping a neighbour, clipped to tissue)."),
]
CellExpansion = Annotated[
    Optional[float],
    typer.Option("--cell-expansion", help="With --objects cells: how far cells reach beyond their nucleus, µm "
                 "[default: 5].", metavar="UM", show_default=False),
]
Positivity = Annotated[
    Optional[PositivityKind],
    typer.Option("--positivity", help="Class each nucleus (or cell) by its mean nuclear DAB optical density, as "
                 "QuPath's positive cell detection does (IHC slides, e.g. Ki67, ER, PR)."),
]
PositivityThreshold = Annotated[
    Optional[str],
    typer.Option("--positivity-threshold", help="DAB OD threshold for Positive [default: 0.2], or three increasing "
                 "ones for 1+/2+/3+ (e.g. 0.2,0.4,0.6).", metavar="OD|T1,T2,T3", show_default=False),
]


def options(objects: ObjectsKind | str | None, cell_expansion: float | None, positivity: PositivityKind | str | None,
            positivity_threshold: str | None):
    """The parsed :class:`nucli.export.cells.ObjectOptions` (one-line errors for bad combinations)."""
    from nucli.export.cells import object_options

    return object_options(objects, cell_expansion, positivity, positivity_threshold)
