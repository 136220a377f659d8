"""Units of per-tile work: batches of tiles, the job that processes one, and shards of a store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from nucli.errors import UsageError


@dataclass(frozen=True)
class Batch:
    """Tiles processed together: store indices whose in-image size is ``extent`` = (w, h)."""

    members: tuple[int, ...]
    extent: tuple[int, int]


def plan_batches(todo: Sequence[int], extents: np.ndarray, batch_size: int) -> list[Batch]:
    """Cut the pending tiles (in order) into chunks of ``batch_size``, each split by in-image size.

    A method never sees padding, so tiles of different sizes (the right and
    bottom edges of the slide) go to different batches.
    """
    out: list[Batch] = []
    todo = [int(i) for i in todo]
    bs = max(1, int(batch_size))
    for k in range(0, len(todo), bs):
        groups: dict[tuple[int, int], list[int]] = {}
        for i in todo[k : k + bs]:
            groups.setdefault((int(extents[i][0]), int(extents[i][1])), []).append(i)
        out.extend(Batch(tuple(m), e) for e, m in groups.items())
    return out


class TileJob:
    """What to do with one batch, split in three steps so they can overlap.

    ``load`` reads from the store (I/O), ``compute`` runs the model, ``finish``
    post-processes and writes the results and the done records. All three must
    be safe to run on a worker that opened the store itself; the object is
    pickled to Dask workers, so keep it small and importable.
    """

    stage: str = ""

    def load(self, store: Any, batch: Batch) -> Any:
        raise NotImplementedError

    def compute(self, method: Any, data: Any) -> Any:
        raise NotImplementedError

    def finish(self, store: Any, method: Any, batch: Batch, computed: Any) -> None:
        raise NotImplementedError

    def run(self, store: Any, method: Any, batch: Batch) -> int:
        self.finish(store, method, batch, self.compute(method, self.load(store, batch)))
        return len(batch.members)


@dataclass(frozen=True)
class Shard:
    """``--shard i/n``: tiles whose store index is ``i`` modulo ``n`` (0-based ``i``)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: "str | Shard | None") -> "Shard | None":
        if text is None or isinstance(text, Shard):
            return text
        parts = str(text).strip().split("/")
        try:
            i, n = (int(p) for p in parts)
        except ValueError:
            i, n = -1, 0
        if len(parts) != 2 or n < 1 or not 0 <= i < n:
            raise UsageError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4 ... 3/4 "
                             "(with a SLURM array --array=0-3 use --shard $SLURM_ARRAY_TASK_ID/4)")
        return cls(i, n)

    def select(self, tiles: np.ndarray) -> np.ndarray:
        """The tiles of ``tiles`` (store indices) that belong to this shard."""
        tiles = np.asarray(tiles)
        return tiles[tiles % self.count == self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
