"""Tiling killed midway (SIGKILL) and rerun gives the same store as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nucli.synthetic import make_tissue, write_pyramidal_tiff
from nucli.tiling.store import RunStore
from nucli.tiling.tiler import run_tiling, tile_slide

SETTINGS = dict(mpp_target=0.5, tile_size=256, overlap=32)

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from nucli.tiling.store import RunStore
    from nucli.tiling.tiler import tile_slide

    kill_at = int(sys.argv[3])
    seen = [0]
    real = RunStore.mark_done

    def mark_done(self, stage, i):
        seen[0] += 1
        if seen[0] == kill_at:  # this tile's pixels are on disk, its done flag is not
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, stage, i)

    RunStore.mark_done = mark_done
    tile_slide(Path(sys.argv[1]), Path(sys.argv[2]), mpp_target=0.5, tile_size=256, overlap=32,
               progress=False, workers=1)
    """
)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    tissue = make_tissue(3072, 2560, 3, seed=21, island_radius=(280, 400))
    return write_pyramidal_tiff(d / "slide.svs", tissue.render, 3072, 2560, mpp=0.5, compression="jpeg")


def _contents(path: Path) -> dict:
    s = RunStore.open(path)
    return {"meta": s.meta, "index": s.indices(), "origin": s.origins(),
            "origin_level0": np.asarray(s.array("origin_level0")[:]),
            "tiles": np.asarray(s.array("tiles")[:]), "done": s.done("tile")}


def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(slide, tmp_path):
    ref = tile_slide(slide, tmp_path / "ref.zarr", progress=False, **SETTINGS)
    n = ref.n_tiles
    assert n >= 10
    kill_at = n // 2
    out = tmp_path / "killed.zarr"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(out), str(kill_at)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    half = RunStore.open(out)
    done = half.done("tile")
    assert done.sum() == kill_at - 1  # killed before the flag of tile kill_at was written
    written_not_done = int(np.flatnonzero(~done)[0])
    assert half.read_tile(written_not_done).any()  # its pixels were there, but it is not trusted

    report = run_tiling(slide, out, progress=False, **SETTINGS)
    assert report.status == "resumed" and report.written == n - (kill_at - 1)
    a, b = _contents(tmp_path / "ref.zarr"), _contents(out)
    assert a["meta"] == b["meta"]
    for key in ("index", "origin", "origin_level0", "tiles", "done"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert b["done"].all()


def test_a_creation_killed_before_the_rename_leaves_no_store(slide, tmp_path):
    """A dead run's hidden partial directory is not mistaken for a store and is cleaned up."""
    out = tmp_path / "run.zarr"
    stale = tmp_path / ".run.zarr.partial-999999"  # no such process
    (stale / "tiles").mkdir(parents=True)
    if _alive(999999):
        pytest.skip("pid 999999 exists here")
    store = tile_slide(slide, out, progress=False, **SETTINGS)
    assert store.is_complete("tile")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.zarr"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
