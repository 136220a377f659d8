"""MCF: nuclei from a handful of templates (Feng et al., mutual-complementing framework).

Detection branch: closed-form correlation filters (one per template and
scale) on HOG-like + colour features, fused by CFF/MFF/top-H and turned into
centres by gradient-direction post-processing. Segmentation branch: a U-Net
trained only on the detection's confident pixels (confidence loss), on
synthetic samples and on its own confident predictions. The two branches
complement each other over a few rounds: the segmentation's nuclei that the
detection missed become new templates.

Importing this package registers the method ``mcf``; torch is imported only
when a model is built or trained. See docs/mcf.md.
"""

from __future__ import annotations

from typing import Any

from nucli.models.base import MethodConfig
from nucli.models.registry import MethodSpec, register

CONFIG = MethodConfig(
    name="mcf",
    mpp=0.5,  # assumed, as for the other methods trained on DSB2018 (no pixel size given)
    nucleus_diameter_px=20.0,
    max_nucleus_diameter_px=128,  # DSB2018-scale nuclei reach 63 px from their centroid
    tile_size=768,
    overlap=128,
    batch_size=4,
    params={
        "mode": "full",
        "seg_threshold": 0.5,
        "det_threshold": 0.4,
        "min_area": 8,
        "marker_radius": 2,
        "neck_depth": 1.0,
        "unet": {"widths": [16, 32, 64, 128]},
    },
)


def _build(config: MethodConfig, weights_path, device: str):
    from nucli.models.mcf.method import build

    return build(config, weights_path, device)


def train_mcf(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Train MCF (see :func:`nucli.models.mcf.complement.train_mcf`)."""
    from nucli.models.mcf.complement import train_mcf as _train

    return _train(*args, **kwargs)


SPEC = register(
    MethodSpec(
        name="mcf",
        summary="MCF: correlation-filter detection from ~10 nucleus templates + confidence-trained U-Net",
        config=CONFIG,
        builder=_build,
        weights_file="mcf_cpu.safetensors",
        weights_sha256="8bd4ac4b617e55f2ad8618cb400ff0e7b13b8c451f68f3f42b6a1248df9c0bdb",
        needs_weights=True,
    )
)
