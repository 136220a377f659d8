"""GeNSeg-Net (the default method): enhancement GAN + 3-class U-Net + watershed.

Importing this package registers the method; torch is imported only when the
method is built.
"""

from __future__ import annotations

from nucli.models.base import MethodConfig
from nucli.models.registry import MethodSpec, register

# Architecture of the shipped CPU preset and the post-processing thresholds tuned
# on the DSB2018 val split (also stored inside the weights file and in
# gensegnet_cpu.json; the weights file's copy wins when they differ).
CPU_PARAMS = {
    "preset": "cpu",
    "generator": {"channels": 16, "n_down": 2, "n_blocks": 9, "max_channels": 48, "input_skip": True},
    "unet": {"widths": [16, 32, 64, 128]},
    "postprocess": {"body_threshold": 0.5, "background_threshold": 0.3, "band_bias": 0.0,
                    "min_seed_area": 6, "min_area": 20, "split_h": 1.0},
    # brightfield: nuclei with mean hematoxylin OD below this are dropped (pink stroma / cytoplasm outlined
    # as nuclei on H&E slides); 0.03 is the largest value that does not lower val brightfield-colour AJI
    "min_hematoxylin_od": 0.03,
    "bf16": "auto",  # bfloat16 autocast where the CPU supports it natively (accuracy-neutral on DSB2018)
    "segmentation_stage": "unet",
}

CONFIG = MethodConfig(
    name="gensegnet",
    mpp=0.35,  # the working scale of the shipped weights (trained on dsb2018 + monuseg + bitdepth_nucseg)
    nucleus_diameter_px=17.0,  # the training reference: MoNuSeg's median nucleus (5.8 µm) at 0.35 µm/px
    # DSB2018-scale nuclei reach ~120 px (24 % of the test nuclear area lies in nuclei
    # more than 31 px from their centroid, none beyond 63 px): bound at 128, overlap to match
    max_nucleus_diameter_px=128,
    tile_size=768,
    overlap=128,
    batch_size=4,
    params=CPU_PARAMS,
)


def _build(config, weights_path, device):
    from nucli.models.gensegnet.method import build

    return build(config, weights_path, device)


SPEC = register(
    MethodSpec(
        name="gensegnet",
        summary="GeNSeg-Net: enhancement GAN + 3-class U-Net + body-seeded watershed (default)",
        config=CONFIG,
        builder=_build,
        weights_file="gensegnet_cpu.safetensors",
        weights_sha256="bac934e511ffd160b1d1d4f6ebc0aa934f9de5e82b48a395ef2e2fce1cfb3b72",
        needs_weights=True,
    )
)
