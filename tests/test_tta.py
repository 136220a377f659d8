"""--tta: flip test-time augmentation from the command line and the Python API."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from nucli.cli import app
from nucli.errors import UsageError
from nucli.models.registry import TTA_METHODS, build_method

runner = CliRunner()


def _png(path, size=(160, 200), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full(size + (3,), (230, 200, 215), np.uint8)
    yy, xx = np.mgrid[:size[0], :size[1]]
    for _ in range(25):
        cy, cx = rng.integers(10, size[0] - 10), rng.integers(10, size[1] - 10)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = (90, 60, 140)
    Image.fromarray(img).save(path)
    return path


@pytest.mark.parametrize("name", TTA_METHODS)
def test_tta_is_a_setting_of_the_built_method(name):
    on = build_method(name, tta=True)
    assert on.supports_tta and on.config.params["tta"] is True
    assert on.describe()["config"]["params"]["tta"] is True  # recorded in the run store
    assert not build_method(name).config.params.get("tta")
    assert build_method(name, tta=False).config.params["tta"] is False


def test_tta_for_a_method_without_it_is_a_usage_error():
    with pytest.raises(UsageError, match="test-time augmentation"):
        build_method("watershed", tta=True)
    assert build_method("watershed", tta=False).name == "watershed"  # off: nothing to refuse


def test_segment_with_tta_records_it_and_a_rerun_without_it_is_refused(tmp_path):
    img = _png(tmp_path / "img.png")
    store = tmp_path / "run.zarr"
    r = runner.invoke(app, ["segment", str(img), "-o", str(tmp_path / "a.geojson"), "--store", str(store),
                            "--tta", "--mpp", "native", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.geojson").exists()
    from nucli.tiling.store import RunStore

    meta = RunStore.open(store, mode="r").stage_meta("segment")
    assert meta["config"]["params"]["tta"] is True
    r = runner.invoke(app, ["segment", str(img), "-o", str(tmp_path / "b.geojson"), "--store", str(store),
                            "--mpp", "native", "-q"])
    assert r.exit_code != 0 and "other settings" in r.output
    assert not (tmp_path / "b.geojson").exists()


def test_evaluate_with_tta_for_watershed_is_one_line(tmp_path):
    from PIL import Image

    d = tmp_path / "set"
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir()
    _png(d / "images" / "a.png")
    Image.fromarray(np.zeros((160, 200), np.uint8)).save(d / "labels" / "a.png")
    r = runner.invoke(app, ["evaluate", "--dataset", str(d), "--method", "watershed", "--tta"])
    assert r.exit_code == 1 and "test-time augmentation" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["evaluate", str(d / "labels"), str(d / "labels"), "--tta"])
    assert r.exit_code == 1 and "only apply with --dataset" in r.output


def test_segment_array_with_tta(tmp_path):
    from PIL import Image

    import nucli

    img = np.asarray(Image.open(_png(tmp_path / "a.png")))
    labels, table = nucli.segment_array(img, method="harunet", mpp="native", tta=True)
    assert labels.shape == img.shape[:2] and len(table["label"]) == labels.max()
    with pytest.raises(UsageError):
        nucli.segment_array(img, method="watershed", tta=True)
