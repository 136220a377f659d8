"""What `nucli train --method mcf` runs: check the template options, load templates, train, export.

Kept here so that the command module only forwards its options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from nucli.errors import InputError, UsageError


def load_templates(templates: Path | None = None, template_image: Path | None = None,
                   template_diameter: float | None = None, from_labels: Path | None = None, n: int = 10,
                   seed: int = 0) -> list[Any]:
    """Templates from exactly one source: a folder of crops, a GeoJSON on an image, or a labelled set."""
    from nucli.models.mcf import templates as tp

    if (templates is None) == (from_labels is None):
        raise UsageError("mcf needs its nucleus templates: give --templates FOLDER|FILE.geojson or "
                         "--from-labels DIR --n N (one of them)")
    if from_labels is not None:
        return tp.from_labels(Path(from_labels), n=n, seed=seed)
    templates = Path(templates)
    if templates.is_dir():
        if template_image is not None:
            raise UsageError("--template-image goes with a GeoJSON --templates file, not a folder of crops")
        return tp.from_crops(templates)
    if templates.name.lower().endswith((".geojson", ".json")):
        if template_image is None:
            raise UsageError("--templates FILE.geojson needs --template-image IMAGE (the image it was drawn on)")
        return tp.from_geojson(Path(template_image), templates, template_diameter)
    if not templates.exists():
        raise InputError(f"--templates {templates} not found")
    raise UsageError(f"--templates {templates}: expected a folder of nucleus crops or a .geojson file")


def train_from_options(data: Path, output: Path, *, templates: Path | None = None, template_image: Path | None = None,
                       template_diameter: float | None = None, from_labels: Path | None = None, n: int = 10,
                       seed: int = 0, rounds: int = 3, val: Path | None = None, resume: bool = False,
                       threads: int | None = None, progress: Callable[[str, int, int], None] | None = None
                       ) -> dict[str, Any]:
    """Train MCF into ``output`` (run files + ``mcf.safetensors`` + ``mcf_detection.safetensors``).

    ``data`` holds the training images (``DIR/images`` or a folder of images);
    their labels, if any, are only used to log per-round metrics, as are
    those of ``val``.
    """
    from nucli.models.mcf.complement import TrainSettings, train_mcf
    from nucli.models.mcf.method import export_detection_only

    if rounds < 1:
        raise UsageError(f"--rounds must be at least 1, got {rounds}")
    tps = load_templates(templates, template_image, template_diameter, from_labels, n, seed)
    output = Path(output)
    settings = TrainSettings(rounds=rounds, seed=seed)
    weights = output / "mcf.safetensors"
    summary = train_mcf(tps, Path(data), output, weights_out=weights, eval_dir=val, settings=settings,
                        resume=resume, threads=threads, progress=progress)
    summary["weights_detection_only"] = str(export_detection_only(weights, output / "mcf_detection.safetensors"))
    return summary
