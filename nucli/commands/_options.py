"""Shared option definitions: one spelling of every option across commands."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

Output = Annotated[Path, typer.Option("-o", "--output", help="Output path.")]
OptOutput = Annotated[Optional[Path], typer.Option("-o", "--output", help="Output path.")]
Method = Annotated[
    Optional[str],
    typer.Option("--method", "-m", help="Segmentation method (see `nucli models`). Default: gensegnet."),
]
Weights = Annotated[
    Optional[Path],
    typer.Option("--weights", help="Weights file (.safetensors) instead of the shipped ones."),
]
MppNumber = Annotated[
    Optional[float],
    typer.Option("--mpp", help="Pixel size of the input in µm/px (overrides the slide's metadata)."),
]
Mpp = Annotated[
    Optional[str],
    typer.Option(
        "--mpp",
        help="Pixel size of the input in µm/px (overrides the slide's metadata); 'auto': the metadata's, and for "
        "an image without one, the zoom at which a few probe tiles show nuclei of the size the method was trained "
        "on (the default for weights trained at one working scale); 'native': the image's own resolution.",
        metavar="NUM|auto|native",
        show_default=False,
    ),
]
MppTarget = Annotated[
    Optional[float],
    typer.Option("--mpp-target", help="Working pixel size in µm/px (default: the method's)."),
]
TileSize = Annotated[int, typer.Option("--tile-size", min=64, help="Tile edge in working pixels.")]
Overlap = Annotated[
    Optional[int],
    typer.Option("--overlap", min=0, help="Tile overlap in working pixels (must exceed the largest nucleus)."),
]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Tiles per model batch.")]
OptBatchSize = Annotated[
    Optional[int],
    typer.Option("--batch-size", min=1, help="Tiles per model batch (default: the method's on the CPU; on a GPU "
                 "as many as its free memory holds)."),
]
Device = Annotated[
    str,
    typer.Option("--device", help="Where the models run: auto (a CUDA GPU when torch sees one, else the CPU), "
                 "cpu, cuda, cuda:N or mps.", metavar="auto|cpu|cuda|cuda:N|mps"),
]
Precision = Annotated[
    Optional[str],
    typer.Option("--precision", help="Mixed precision on a GPU: auto (bf16 where the GPU has it, else fp16), "
                 "bf16, fp16 or fp32 (off). The CPU keeps the method's own setting.",
                 metavar="auto|bf16|fp16|fp32", show_default=False),
]
Tta = Annotated[
    bool,
    typer.Option("--tta", help="Flip test-time augmentation (gensegnet, harunet): the mean of the network's maps "
                 "over the 4 flips of each tile; more accurate, 4x the network time."),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")]
JsonSummary = Annotated[bool, typer.Option("--json", help="Print the final summary as one JSON object.")]
TissueMask = Annotated[
    bool,
    typer.Option("--tissue-mask/--no-tissue-mask", help="Skip tiles without tissue."),
]
Workers = Annotated[
    Optional[int],
    typer.Option("--workers", min=1, help="Run on a local Dask cluster of this many worker processes "
                 "(with --cluster slurm: workers to start)."),
]
Threads = Annotated[
    Optional[int], typer.Option("--threads", min=1, help="Threads per Dask worker (default 1).")
]
Scheduler = Annotated[
    Optional[str],
    typer.Option("--scheduler", help="Address of an existing dask.distributed scheduler (tcp://host:port)."),
]


class ClusterKind(str, Enum):
    local = "local"
    slurm = "slurm"


Cluster = Annotated[
    Optional[ClusterKind], typer.Option("--cluster", help="Start a cluster: local or slurm (dask-jobqueue).")
]
ClusterConfig = Annotated[
    Optional[Path], typer.Option("--cluster-config", help="YAML/JSON with dask-jobqueue SLURMCluster settings.")
]
Shard = Annotated[
    Optional[str],
    typer.Option("--shard", help="Process only shard i of n ('i/n', 0-based) -- for HPC job arrays."),
]
