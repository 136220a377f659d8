"""A 20,000 x 20,000 px pyramidal slide tiles with little memory; the mask keeps only the islands."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nucli.synthetic import SyntheticTissue, write_synthetic_slide
from nucli.tiling.store import RunStore

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from nucli.tiling.tiler import run_tiling

    rep = run_tiling(Path(sys.argv[1]), Path(sys.argv[2]), mpp_target=0.5, tile_size=512, overlap=64,
                     progress=False)
    # peak resident memory of this process since exec (ru_maxrss would include the parent's at fork)
    try:
        status = open("/proc/self/status").read()
        peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(json.dumps({"peak_rss": peak, "tiles": rep.n_tiles, "grid_tiles": rep.grid_tiles,
                      "seconds": rep.seconds}))
    """
)


def _tile_distance(tissue: SyntheticTissue, x: float, y: float, size: float) -> float:
    """Approximate distance (level-0 px) from a tile to the nearest island; < 0 inside one."""
    best = np.inf
    for isl in tissue.islands:
        px = np.clip(isl.cx, x, x + size - 1)
        py = np.clip(isl.cy, y, y + size - 1)
        rho = np.hypot((px - isl.cx) / isl.rx, (py - isl.cy) / isl.ry)
        best = min(best, (rho - 1.0) * min(isl.rx, isl.ry))
    return best


def _check_big(tmp_path: Path, size: int, n_islands: int) -> dict:
    import openslide

    path = tmp_path / "big.svs"
    tissue = write_synthetic_slide(path, size, size, n_islands=n_islands, seed=4, mpp=0.5, compression="jpeg")
    out = tmp_path / "big.zarr"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    decoded = size * size * 3
    print(f"\n{size}x{size}: decoded {decoded / 1e9:.2f} GB, peak RSS {stats['peak_rss'] / 1e6:.0f} MB, "
          f"{stats['tiles']}/{stats['grid_tiles']} tiles, {stats['seconds']:.1f} s")
    assert stats["peak_rss"] < decoded / 4, stats

    store = RunStore.open(out)
    assert store.is_complete("tile") and store.meta["downsample"] == 1.0
    grid = store.grid
    kept = {tuple(map(int, rc)) for rc in store.indices()}
    margin = 25 / 0.5 + 2 * store.meta["mask_downsample"]  # mask dilation (25 µm) + two mask px
    must = {rc for rc in grid.all_tiles() if _tile_distance(tissue, *grid.origin(*rc), 512) < -8}
    may = {rc for rc in grid.all_tiles() if _tile_distance(tissue, *grid.origin(*rc), 512) <= margin}
    assert must <= kept <= may
    assert len(must) > 10 * n_islands and len(kept) < 0.25 * len(grid)

    # tiles equal the slide at their recorded coordinates (a sample)
    osr = openslide.OpenSlide(str(path))
    origins0 = np.asarray(store.array("origin_level0")[:])
    for i in np.linspace(0, store.n_tiles - 1, 5).astype(int):
        x, y = (int(v) for v in origins0[i])
        ref = np.asarray(osr.read_region((x, y), 0, (512, 512)))[..., :3]
        np.testing.assert_array_equal(store.read_tile(int(i)), ref)
    return stats


def test_20k_slide_tiles_with_little_memory_and_skips_background(tmp_path):
    _check_big(tmp_path, 20_000, 3)


@pytest.mark.slow
def test_40k_slide_tiles_with_little_memory_and_skips_background(tmp_path):
    _check_big(tmp_path, 40_000, 4)
