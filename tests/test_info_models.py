"""`nucli info`, `nucli models`, --json summaries and the documented exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from nucli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_slide(tmp_path_factory) -> Path:
    from nucli.demo import write_demo_slide

    return write_demo_slide(tmp_path_factory.mktemp("info") / "demo.svs", crop=256, stain="ihc")


@pytest.fixture(scope="module")
def plain_png(tmp_path_factory) -> Path:
    from nucli.synthetic import ellipse_image, write_plain_image

    img = ellipse_image((300, 400), [(60, 60), (200, 150), (330, 240)], radius=10)
    return write_plain_image(tmp_path_factory.mktemp("png") / "discs.png", img)


def _json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


# --------------------------------------------------------------------------- nucli info


def test_info_json_describes_the_slide(demo_slide):
    from nucli.demo import MARGIN

    info = _json(runner.invoke(app, ["info", str(demo_slide), "--method", "watershed", "--probe", "0", "--json"]))
    side = 256 + 2 * MARGIN
    assert (info["width"], info["height"]) == (side, side)
    assert [lv["downsample"] for lv in info["levels"]] == [1.0, 2.0, 4.0]
    assert [(lv["width"], lv["height"]) for lv in info["levels"]] == [(side, side), (side // 2, side // 2),
                                                                       (side // 4, side // 4)]
    assert info["mpp"] == pytest.approx(0.5) and info["mpp_from"] == "metadata"
    assert info["vendor"] == "aperio" and info["reader"] == "openslide"
    assert info["objective_power"] == 20
    assert info["associated_images"]["thumbnail"][0] > 0
    assert info["size_mm"] == [pytest.approx(side * 0.5 / 1000)] * 2
    # tissue: the 256 x 256 px of tissue (grown by the mask's margin) inside glass
    assert 256**2 / side**2 < info["tissue_fraction"] < 1.0
    assert info["method"] == "watershed" and info["working_mpp"] == pytest.approx(0.5)
    assert info["seconds_per_tile"] is None and "--probe 0" in info["estimate"]


def test_info_tiles_match_what_tile_creates(demo_slide, tmp_path):
    args = ["--method", "watershed", "--tile-size", "32", "--overlap", "8"]
    info = _json(runner.invoke(app, ["info", str(demo_slide), *args, "--probe", "0", "--json"]))
    tiled = _json(runner.invoke(app, ["tile", str(demo_slide), "-o", str(tmp_path / "r.zarr"), *args, "--json"]))
    assert info["tiles"] == tiled["tiles"]
    assert info["grid_tiles"] == tiled["grid_tiles"]
    assert info["tiles"] < info["grid_tiles"]  # glass tiles are left out
    assert info["working_size"] == [info["width"], info["height"]]


def test_info_estimates_time_by_running_the_method(demo_slide):
    info = _json(runner.invoke(app, ["info", str(demo_slide), "--method", "watershed", "--tile-size", "128",
                                     "--overlap", "32", "--probe", "2", "--json"]))
    assert info["seconds_per_tile"] > 0
    assert info["estimated_seconds"] >= info["seconds_per_tile"] * info["tiles"] - 0.05
    assert "on this machine" in info["estimate"]


def test_info_method_changes_the_plan(demo_slide):
    a = _json(runner.invoke(app, ["info", str(demo_slide), "--method", "watershed", "--probe", "0", "--json"]))
    b = _json(runner.invoke(app, ["info", str(demo_slide), "--method", "watershed", "--mpp-target", "1.0",
                                  "--probe", "0", "--json"]))
    assert b["downsample"] == 2.0 and b["working_size"] == [a["width"] // 2, a["height"] // 2]


def test_info_human_output(demo_slide):
    res = runner.invoke(app, ["info", str(demo_slide), "--method", "watershed", "--probe", "0"])
    assert res.exit_code == 0, res.output
    for text in ("pyramid levels", "0.5 µm/px", "aperio", "tiles", "thumbnail"):
        assert text in res.stdout


def test_info_quiet_prints_nothing(demo_slide):
    res = runner.invoke(app, ["info", str(demo_slide), "--method", "watershed", "--probe", "0", "--quiet"])
    assert res.exit_code == 0 and res.stdout.strip() == ""


def test_info_without_pixel_size(plain_png):
    info = _json(runner.invoke(app, ["info", str(plain_png), "--method", "watershed", "--probe", "0", "--json"]))
    assert info["mpp"] is None and info["working_mpp"] is None and "--mpp" in info["note"]
    assert info["levels"] == [{"level": 0, "width": 400, "height": 300, "downsample": 1.0}]
    res = runner.invoke(app, ["info", str(plain_png), "--method", "watershed", "--mpp-target", "0.5"])
    assert res.exit_code == 2 and "pass --mpp" in res.output
    info = _json(runner.invoke(app, ["info", str(plain_png), "--method", "watershed", "--mpp", "0.25",
                                     "--probe", "0", "--json"]))
    assert info["mpp"] == 0.25 and info["mpp_from"] == "--mpp" and info["downsample"] == 2.0


def test_info_gensegnet_without_weights_still_plans(demo_slide):
    from nucli.models.registry import get_spec

    if get_spec("gensegnet").weights_path.exists():
        pytest.skip("gensegnet weights are installed")
    info = _json(runner.invoke(app, ["info", str(demo_slide), "--json"]))
    assert info["method"] == "gensegnet" and info["tiles"] >= 1
    assert info["estimated_seconds"] is None and "weights" in info["estimate"]


def test_info_bad_inputs(tmp_path, demo_slide):
    res = runner.invoke(app, ["info", str(tmp_path / "missing.svs")])
    assert res.exit_code == 2 and "not found" in res.output and "Traceback" not in res.output
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"this is not a slide at all")
    res = runner.invoke(app, ["info", str(junk)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = runner.invoke(app, ["info", str(demo_slide), "--method", "nope"])
    assert res.exit_code == 1 and "known methods" in res.output
    res = runner.invoke(app, ["info", str(demo_slide), "--probe", "-1"])
    assert res.exit_code == 1
    res = runner.invoke(app, ["info", str(demo_slide), "--method", "watershed", "--tile-size", "128",
                              "--overlap", "128"])
    assert res.exit_code == 1 and "--overlap" in res.output


def test_info_does_not_modify_the_slide(demo_slide):
    before = (demo_slide.stat().st_mtime_ns, demo_slide.read_bytes())
    runner.invoke(app, ["info", str(demo_slide), "--method", "watershed", "--probe", "1", "--json"])
    assert (demo_slide.stat().st_mtime_ns, demo_slide.read_bytes()) == before


# --------------------------------------------------------------------------- nucli models


def test_models_json_lists_every_registered_method():
    from nucli.models.registry import DEFAULT_METHOD, available, sha256_of

    entries = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert {e["name"] for e in entries} == set(available())
    assert [e["name"] for e in entries if e["default"]] == [DEFAULT_METHOD]
    assert entries[0]["name"] == DEFAULT_METHOD
    for e in entries:
        spec = available()[e["name"]]
        assert e["mpp"] == spec.config.mpp
        if spec.weights_path is None:
            assert e["weights_status"] == "not needed"
        elif not spec.weights_path.exists():
            assert e["weights_status"] in ("missing", "not shipped (optional)") and e["sha256"] is None
        else:
            assert e["sha256"] == sha256_of(spec.weights_path)
            if spec.weights_sha256:
                assert e["weights_status"] == "ok (SHA-256 verified)"
    # metrics measured on part of the test split say so (spatialprior: its H&E images only)
    by_name = {e["name"]: e for e in entries}
    if by_name["spatialprior"]["test_metrics"]:
        assert "brightfield-color only" in by_name["spatialprior"]["test_subset"]
    assert by_name["watershed"]["test_subset"] is None
    table = runner.invoke(app, ["models"], env={"COLUMNS": "200"}).stdout
    assert "brightfield-color only" in table


def test_models_reports_a_tampered_weights_file(tmp_path, monkeypatch):
    from nucli.models import registry
    from nucli.models.base import MethodConfig
    from nucli.models.registry import MethodSpec, available

    available()
    weights = tmp_path / "toy_cpu.safetensors"
    weights.write_bytes(b"not the pinned bytes")
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    spec = MethodSpec(name="toy", summary="toy", config=MethodConfig(name="toy", mpp=0.25),
                      builder=lambda c, w, d: None, weights_file=weights.name, weights_sha256="0" * 64,
                      needs_weights=True)
    monkeypatch.setitem(registry._REGISTRY, "toy", spec)
    (tmp_path / "toy_cpu.json").write_text(json.dumps({"val": {"aji": 0.9, "pq": 0.9},
                                                       "test": {"aji": 0.61, "pq": 0.55, "dice": 0.8}}))
    entry = {e["name"]: e for e in json.loads(runner.invoke(app, ["models", "--json"]).stdout)}["toy"]
    assert entry["weights_status"] == "SHA-256 MISMATCH"
    assert entry["test_metrics"] == {"aji": 0.61, "pq": 0.55, "dice": 0.8}
    assert entry["test_metrics_source"] == "toy_cpu.json"
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0 and "toy" in res.stdout and "mismatch" in res.stdout
    one = json.loads(runner.invoke(app, ["models", "toy", "--json"]).stdout)
    assert one["name"] == "toy" and one["mpp"] == 0.25


def test_models_unknown_name_is_a_usage_error():
    res = runner.invoke(app, ["models", "nope"])
    assert res.exit_code == 1 and "known methods" in res.output


def test_models_one_method_shows_its_card(tmp_path, monkeypatch):
    from nucli.models import registry

    registry.available()
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    (tmp_path / "watershed.md").write_text("# Watershed card\n\n## Test split\n\n| set | AJI | PQ |\n|---|---|---|\n"
                                           "| dsb2018/test | 0.514 | 0.543 |\n")
    res = runner.invoke(app, ["models", "watershed"])
    assert res.exit_code == 0, res.output
    assert "Watershed card" in res.stdout and "AJI 0.514" in res.stdout


# --------------------------------------------------------------------------- model-card parsing


def test_metrics_from_markdown_pick_the_methods_own_test_row():
    from nucli.api import metrics_in_markdown

    card = """# HARU-Net (cpu preset)

- data: dsb2018/train

## Validation

| split | AJI | PQ |
|---|---|---|
| val | 0.80 | 0.77 |

## Ablation on dsb2018/test

| method | AJI | AJI+ | Dice | PQ | F1 |
|---|---|---|---|---|---|
| U-Net + watershed (test) | 0.70 | 0.71 | 0.80 | 0.65 | 0.75 |
| **HARU-Net** + post-processing (test) | **0.77** | 0.78 | 0.83 | 0.72 | 0.80 |
"""
    m = metrics_in_markdown(card, "harunet")
    assert m["aji"] == 0.77 and m["aji_plus"] == 0.78 and m["pq"] == 0.72 and m["f1"] == 0.80
    assert "HARU-Net" in m["row"]
    # without the method's name, the first test row
    assert metrics_in_markdown(card)["aji"] == 0.70


def test_metrics_from_markdown_table_under_a_test_heading():
    from nucli.api import metrics_in_markdown

    card = "## Accuracy on the test split (56 images)\n\n| aggregate | AJI | PQ | Dice |\n|:--|--:|--:|--:|\n" \
           "| mean over images | 0.701 | 0.652 | 0.790 |\n| pooled over nuclei | 0.60 | 0.66 | 0.74 |\n"
    assert metrics_in_markdown(card) == {"aji": 0.701, "pq": 0.652, "dice": 0.790, "row": "mean over images"}
    per_modality = "## Test split\n\n| modality | AJI | PQ |\n|---|---|---|\n| fluorescence | 0.8 | 0.7 |\n" \
                   "| brightfield | 0.5 | 0.4 |\n| all (mean over images) | 0.75 | 0.66 |\n"
    assert metrics_in_markdown(per_modality)["aji"] == 0.75
    assert metrics_in_markdown("# card\n\nno table here\n") is None
    assert metrics_in_markdown("| split | AJI | PQ |\n|---|---|---|\n| val | 0.8 | 0.7 |\n") is None


def test_metrics_from_json_prefer_mean_over_images():
    from nucli.api import _metrics_in_json

    doc = {"candidates": {"unet": {"val": {"aji": 0.9, "pq": 0.9}}},
           "evaluate_test": {"aggregate": {"mean_over_images": {"aji": 0.66, "aji_plus": 0.67, "pq": 0.6},
                                           "pooled_over_nuclei": {"aji": 0.5, "pq": 0.5}}}}
    assert _metrics_in_json(doc) == {"aji": 0.66, "aji_plus": 0.67, "pq": 0.6}
    assert _metrics_in_json({"val": {"aji": 0.9, "pq": 0.9}}) is None


# --------------------------------------------------------------------------- --json and exit codes


def test_json_summaries_are_single_objects(tmp_path, plain_png):
    out = tmp_path / "o.geojson"
    res = runner.invoke(app, ["segment", str(plain_png), "-o", str(out), "--method", "watershed", "--json"])
    s = _json(res)
    assert s["nuclei"] == 3 and s["outputs"] == [str(out)]
    assert len(res.stdout.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [
    [],                                            # no command: help, usage error
    ["bogus"],                                     # unknown command
    ["info"],                                      # missing argument
    ["tile", "x.svs", "-o", "y.zarr", "--tile-size", "3"],  # value out of range
    ["segment", "x.svs", "-o", "y.geojson", "--no-such-option"],
    ["segment", "x.svs", "-o", "y.unknown-format", "--method", "watershed"],  # nucli's own UsageError
])
def test_usage_errors_exit_1(argv, tmp_path):
    res = runner.invoke(app, argv)
    assert res.exit_code == 1, res.output


def test_input_errors_exit_2(tmp_path, plain_png):
    res = runner.invoke(app, ["segment", str(tmp_path / "missing.svs"), "-o", str(tmp_path / "o.geojson"),
                              "--method", "watershed"])
    assert res.exit_code == 2 and "not found" in res.output
    out = tmp_path / "exists.geojson"
    out.write_text("{}")
    res = runner.invoke(app, ["segment", str(plain_png), "-o", str(out), "--method", "watershed"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert out.read_text() == "{}"


def test_processing_error_exits_3(tmp_path):
    from nucli.synthetic import ellipse_image, write_plain_image

    img = write_plain_image(tmp_path / "big.png", ellipse_image((200, 200), [(64, 64)], radius=15))
    res = runner.invoke(app, ["segment", str(img), "-o", str(tmp_path / "o.geojson"), "--method", "watershed",
                              "--tile-size", "64", "--overlap", "0"])
    assert res.exit_code == 3 and "--overlap" in res.output
    assert not (tmp_path / "o.geojson").exists()


COMMANDS = ("tile", "enhance", "segment", "stitch", "evaluate", "train", "info", "models", "demo")


def _help(cmd: str) -> str:
    res = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    return res.stdout


def _example_lines(text: str) -> list[str]:
    """The command lines of the help's Examples section (up to the argument/option panels)."""
    section = text.partition("Examples:")[2].partition("\u256d")[0]
    return [line.strip() for line in section.splitlines() if line.strip().startswith("nucli ")]


def test_every_command_documents_an_example_and_shared_option_names():
    """Every command shows examples in --help; shared options keep one spelling."""
    for cmd in COMMANDS:
        text = _help(cmd)
        assert "Examples" in text and f"nucli {cmd}" in text, cmd
    shared = ("--overwrite", "--json", "--quiet")
    for cmd, opts in {"info": ("--method", "--weights", "--mpp", "--tile-size", "--overlap", "--json", "--quiet"),
                      "demo": ("--output", "--method", "--weights", *shared),
                      "models": ("--json", "--quiet"),
                      "tile": ("--output", "--method", "--mpp", "--mpp-target", "--tile-size", "--overlap", *shared),
                      "segment": ("--output", "--method", "--weights", "--mpp", "--mpp-target", "--tile-size",
                                  "--overlap", "--format", "--overlay", *shared),
                      "stitch": ("--output", "--format", "--overlay", *shared),
                      "enhance": ("--output", "--weights", *shared),
                      "evaluate": ("--output", "--method", "--weights", *shared),
                      "train": ("--output", "--method", *shared)}.items():
        text = _help(cmd)
        for o in opts:
            assert o in text, (cmd, o)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_examples_use_only_options_the_command_accepts(cmd):
    """Each example line in --help runs this command and names only options it declares."""
    import re

    from typer.main import get_command

    command = get_command(app).commands[cmd]
    declared = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    text = _help(cmd)
    options_panel = text[text.index("Options"):]
    examples = _example_lines(text)
    assert len(examples) >= 2, (cmd, examples)
    # every example in the docstring is shown whole, on one line, at 80 columns
    documented = _example_lines(command.help or "")
    assert documented == examples, (cmd, documented, examples)
    for line in examples:
        words = line.split()
        assert words[:2] == ["nucli", cmd], line
        long_opts = [w.split("=", 1)[0] for w in words if w.startswith("--")]
        short_opts = [w for w in words if re.fullmatch(r"-[A-Za-z]", w)]
        for o in long_opts:
            assert re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", options_panel), (cmd, line, o)
        for o in long_opts + short_opts:
            assert o in declared, (cmd, line, o)


def test_segment_array_matches_the_cli(tmp_path, plain_png):
    """The Python API and `nucli segment` find the same nuclei (one pipeline, not two)."""
    import csv

    import nucli
    from nucli.slide import open_slide

    with open_slide(plain_png) as s:
        img = s.read_region(0, 0, *s.dimensions)
    labels, table = nucli.segment_array(img, method="watershed")
    out = tmp_path / "o.csv"
    assert runner.invoke(app, ["segment", str(plain_png), "-o", str(out), "--method", "watershed"]).exit_code == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(table["label"]) == int(labels.max())
    cli_areas = sorted(float(r["area_px2"]) for r in rows)
    assert cli_areas == sorted(table["area_px2"].tolist())
    assert np.allclose(sorted(float(r["centroid_x_px"]) for r in rows), sorted(table["centroid_x_px"]), atol=1e-3)
