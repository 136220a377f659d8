import numpy as np
import pytest

from nucli.errors import UsageError
from nucli.tiling.grid import TileGrid, axis_starts


@pytest.mark.parametrize("length,tile,overlap", [(1000, 512, 64), (512, 512, 64), (300, 512, 64),
                                                 (5000, 256, 32), (1025, 512, 0), (2967, 512, 96)])
def test_axis_covers_length_with_at_least_overlap(length, tile, overlap):
    s = axis_starts(length, tile, overlap)
    assert s[0] == 0
    assert s[-1] + tile >= length
    assert all(b > a for a, b in zip(s, s[1:]))
    for a, b in zip(s, s[1:]):
        assert a + tile - b >= overlap  # neighbours overlap by >= overlap
    if length >= tile:
        assert s[-1] + tile == length  # every tile lies in the image


def test_cores_partition_the_image():
    g = TileGrid(2967, 2220, 512, 64)
    owner = np.zeros((g.height, g.width), np.int32)
    ys, xs = np.mgrid[0:g.height, 0:g.width]
    for k, (r, c) in enumerate(g.all_tiles()):
        owner += g.owns(r, c, xs + 0.5, ys + 0.5).astype(np.int32)
    assert (owner == 1).all()


def test_bad_overlap():
    with pytest.raises(UsageError):
        axis_starts(100, 64, 64)
