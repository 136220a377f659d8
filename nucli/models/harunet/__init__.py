"""HARU-Net: dual foreground/contour network with contour-aware instance recovery.

The network (:mod:`.network`) predicts a nucleus-foreground map and a thick
contour map; :mod:`.postprocess` turns them into instances (components of
foreground minus contour, grown back over the foreground). Importing this
module registers the method; torch is imported only when a model is built.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from nucli.errors import UsageError, WeightsError
from nucli.models.base import Method, MethodConfig, TileResult
from nucli.models.registry import MethodSpec, register

log = logging.getLogger(__name__)

NAME = "harunet"
STRIDE = 32  # network stride (see network.STRIDE; duplicated to keep this module torch-free)
PRESET_NAMES = ("cpu", "paper")

DEFAULT_PARAMS: dict[str, Any] = {
    "preset": "cpu",
    "in_channels": 1,
    "mask_threshold": 0.5,
    "contour_threshold": 0.5,
    "min_seed_area": 4,
    "min_area": 10,
    "contour_thickness": 1,  # training target: dilation radius of the inner boundary
    "tta": False,  # average the maps over the 4 flips of each tile (4x network time)
    "bf16": "auto",  # bfloat16 autocast on CPUs with native support (see gensegnet.method.use_bf16)
}

DEFAULT_CONFIG = MethodConfig(
    name=NAME,
    mpp=0.35,  # the working scale of the shipped weights (trained on dsb2018 + monuseg + bitdepth_nucseg)
    nucleus_diameter_px=17.0,  # the training reference: MoNuSeg's median nucleus at 0.35 µm/px
    max_nucleus_diameter_px=128,  # as GeNSeg-Net: DSB2018-scale nuclei reach 63 px from their centroid
    tile_size=768,
    overlap=128,
    batch_size=4,
    params=dict(DEFAULT_PARAMS),
)


def pad_to_stride(batch: np.ndarray, stride: int = STRIDE) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad (B, H, W) on the bottom/right to multiples of ``stride``; return it and (H, W)."""
    h, w = batch.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    if ph or pw:
        pad = [(0, 0)] * (batch.ndim - 2) + [(0, ph), (0, pw)]
        batch = np.pad(batch, pad, mode="reflect" if min(h, w) > 1 else "edge")
    return batch, (h, w)


def preprocess(tiles: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB (or (B, H, W) gray) -> (B, H, W) float32 in [0, 1], nuclei bright.

    The same convention as GeNSeg-Net: grayscale, brightfield inverted,
    percentile stretch, each tile on its own.
    """
    from nucli.models.gensegnet.preprocess import normalize_batch

    return normalize_batch(tiles)


def predict_maps(net: Any, images: np.ndarray, device: str = "cpu", tta: bool = False,
                 bf16: bool = False, amp: Any = None) -> np.ndarray:
    """Run ``net`` (eval mode) on (B, H, W) normalised images -> (B, 2, H, W) probabilities.

    ``tta``: the mean of the probabilities over the identity, horizontal, vertical and
    double flip of each image (flip, predict, flip back), i.e. 4 network passes.
    ``bf16``: bfloat16 autocast (CPU). On CPU the input is channels-last, which oneDNN
    convolutions run about 1.7x faster (exact: same float32 results). ``amp``: the autocast
    dtype on a GPU (torch.bfloat16 or float16; None: as on the CPU).
    """
    import torch

    padded, (h, w) = pad_to_stride(np.asarray(images, np.float32))
    x = torch.from_numpy(np.ascontiguousarray(padded[:, None])).to(device)
    if x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    flips = ((), (-1,), (-2,), (-2, -1)) if tta else ((),)
    cast = (torch.autocast(x.device.type, dtype=amp) if amp is not None
            else torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16)))
    with torch.inference_mode(), cast:
        prob = None
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            fused, _ = net(xi)
            p = torch.sigmoid(fused.float())
            p = torch.flip(p, dims) if dims else p
            prob = p if prob is None else prob + p
        prob = (prob / len(flips))[..., :h, :w]
    return prob.float().cpu().numpy()


def maps_to_labels(maps: np.ndarray, params: dict[str, Any] | None = None, max_diameter: float = 0) -> np.ndarray:
    """(2, H, W) [mask, contour] probabilities -> (H, W) int32 instances with ``params`` thresholds.

    ``max_diameter`` > 0 drops instances reaching farther than ``max_diameter / 2 - 1`` px
    from their centroid (see :func:`nucli.postprocess.drop_oversized`).
    """
    from nucli.models.harunet.postprocess import instances_from_maps
    from nucli.postprocess import drop_oversized

    p = {**DEFAULT_PARAMS, **(params or {})}
    labels = instances_from_maps(
        maps[0], maps[1],
        mask_threshold=float(p["mask_threshold"]),
        contour_threshold=float(p["contour_threshold"]),
        min_seed_area=int(p["min_seed_area"]),
        min_area=int(p["min_area"]),
    )
    return drop_oversized(labels, max_diameter)


class HARUNetMethod(Method):
    """Runs the network on a batch of tiles; post-processes maps into instances."""

    #: ``params.tta``: flip test-time augmentation (:func:`predict_maps`)
    supports_tta = True

    def __init__(self, config: MethodConfig, net: Any, device: str = "cpu"):
        from nucli.models.gensegnet.method import use_bf16

        super().__init__(config)
        self.net = net
        self.device = device
        self.bf16 = use_bf16(config.params.get("bf16", False), device)
        if str(device) == "cpu":
            import torch

            self.net.to(memory_format=torch.channels_last)

    def predict_maps(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W) normalised float images -> (B, 2, H, W) float32 probabilities [mask, contour]."""
        return predict_maps(self.net, images, self.device, tta=bool(self.config.params.get("tta", False)),
                            bf16=self.bf16, amp=self.amp_dtype)

    def infer(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.asarray(tiles)
        if tiles.ndim not in (3, 4) or tiles.shape[0] == 0:
            raise UsageError(f"expected a (B, H, W, 3) batch of tiles, got shape {tiles.shape}")
        return self.predict_maps(preprocess(tiles))

    def postprocess(self, raw: np.ndarray) -> list[TileResult]:
        cap = float(self.config.max_nucleus_diameter_px)
        return [TileResult(labels=maps_to_labels(maps, self.config.params, cap)) for maps in np.asarray(raw)]

    def postprocess_resampled(self, raw: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        """The maps resampled bilinearly to ``rgb``'s pixels, then the same recovery with its areas
        and the size cap in the image's pixels."""
        from nucli.postprocess import resample_raw

        maps, s = resample_raw(raw, np.asarray(rgb).shape[:2])
        p = {**DEFAULT_PARAMS, **self.config.params}
        p["min_seed_area"] = max(1, round(int(p["min_seed_area"]) * s * s))
        p["min_area"] = max(1, round(int(p["min_area"]) * s * s))
        return maps_to_labels(maps, p, float(self.config.max_nucleus_diameter_px) * s)


def build_network(preset: str = "cpu", in_channels: int = 1) -> Any:
    """A freshly initialised HARU-Net of the given preset (torch module)."""
    from nucli.models.harunet.network import HARUNet

    if preset not in PRESET_NAMES:
        raise UsageError(f"unknown HARU-Net preset '{preset}'; choose one of: {', '.join(PRESET_NAMES)}")
    return HARUNet(preset, in_channels=in_channels)


def load_network(path: Path, params: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Network with the weights of ``path`` (its preset taken from the file); returns (net, stored config)."""
    from nucli.models.weights_io import load_into, load_weights

    tensors, stored = load_weights(Path(path), NAME)
    p = {**DEFAULT_PARAMS, **(params or {}), **(stored.get("params") or {})}
    preset, channels = p.get("preset"), p.get("in_channels")
    if preset not in PRESET_NAMES or not isinstance(channels, int) or isinstance(channels, bool) \
            or not 1 <= channels <= 4:
        raise WeightsError(f"{path}: not a usable {NAME} weights file (preset {preset!r}, in_channels "
                           f"{channels!r}; expected a preset of {', '.join(PRESET_NAMES)} and 1-4 channels)")
    net = build_network(str(preset), int(channels))
    load_into(net, tensors, path, NAME)
    net.eval()
    return net, stored


def _builder(config: MethodConfig, weights: Path | None, device: str) -> Method:
    if weights is None:
        raise WeightsError(f"method '{NAME}' needs weights; train them with `nucli train --method {NAME}` "
                           "and pass --weights")
    net, stored = load_network(weights, config.params)
    # thresholds and preset stored with the weights are the defaults; explicit config wins for
    # post-processing settings only when they differ from the registry defaults
    params = {**DEFAULT_PARAMS, **(stored.get("params") or {})}
    for key, value in config.params.items():
        if key not in DEFAULT_PARAMS or value != DEFAULT_PARAMS[key]:
            params[key] = value
    params["preset"] = (stored.get("params") or {}).get("preset", params["preset"])
    from nucli.models.gensegnet.method import adopt_working_scale

    cfg = MethodConfig.from_dict({**adopt_working_scale(config.to_dict(), stored), "params": params})
    return HARUNetMethod(cfg, net.to(device), device)


register(
    MethodSpec(
        name=NAME,
        summary="HARU-Net: residual U-blocks + attention, foreground/contour maps, contour-aware instance growth",
        config=DEFAULT_CONFIG,
        builder=_builder,
        weights_file="harunet_cpu.safetensors",
        weights_sha256="9a1566794f58becf8f921dbe94012aa068f418639d6366f679290908a2122540",
        needs_weights=True,
    )
)
