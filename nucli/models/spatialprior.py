"""``spatialprior``: nuclei of a stain without annotations, learnt from unpaired masks of another stain.

After Le Bescond et al., "Unsupervised Nuclei Segmentation using Spatial
Organization Priors" (MICCAI 2022). A U-Net segmentor S maps an RGB tile to one
logit per pixel; during training its logits are sharpened (multiplied by
``r = 60``) before a PatchGAN discriminator compares them with real, unpaired
nucleus masks of any stain, and a reconstructor maps S's output back to the
tile (see :mod:`nucli.training.spatialprior`). Only S is kept.

At inference a tile (any size, RGB uint8) is optionally rescaled by ``scale``
(the factor that brought the training images to the prior's nucleus size),
segmented, brought back to its size and post-processed: threshold, median
filter (5 px), optional erosion, distance-transform watershed -> instances.

Settings (``MethodConfig.params``): ``segmentor`` (``widths`` of the U-Net),
``scale`` (float), ``postprocess`` (``threshold``, ``median``, ``erosion``,
``min_distance_px``, ``h``, ``min_area_px``). The weights file stores all of
them; its copy wins over these defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nucli.errors import InputError, WeightsError
from nucli.models.base import Method, MethodConfig, TileResult
from nucli.models.registry import MethodSpec, register

METHOD = "spatialprior"

DEFAULT_POSTPROCESS = {"threshold": 0.5, "median": 5, "erosion": 0, "min_distance_px": 6.0, "h": 1.0,
                       "min_area_px": 15}

CPU_PARAMS = {
    "preset": "cpu",
    "segmentor": {"widths": [16, 32, 64, 128], "norm": "instance"},
    "scale": 1.0,
    "postprocess": dict(DEFAULT_POSTPROCESS),
}

CONFIG = MethodConfig(
    name=METHOD,
    mpp=0.5,  # the pixel size of the prior masks it learnt from (assumed, as for DSB2018)
    nucleus_diameter_px=19.0,
    max_nucleus_diameter_px=64,
    tile_size=512,
    overlap=64,
    batch_size=4,
    params=CPU_PARAMS,
)


@dataclass(frozen=True)
class PostprocessParams:
    threshold: float = 0.5  # on the (unsharpened) nucleus probability
    median: int = 5  # median filter window on the binary mask (px; <= 1 disables)
    erosion: int = 0  # erosion radius (px) against thin artefacts; 0 disables
    min_distance_px: float = 6.0  # closest two nucleus centres may be (watershed seeds)
    h: float = 1.0  # distance-map peak height (px) for a seed
    min_area_px: float = 15.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "PostprocessParams":
        d = d or {}
        return cls(**{k: type(getattr(cls, k))(d[k]) for k in cls.__dataclass_fields__ if k in d})


def instances_from_prob(prob: np.ndarray, params: PostprocessParams = PostprocessParams(),
                        max_extent: float = 64.0) -> np.ndarray:
    """(H, W) nucleus probability -> (H, W) int32 instance labels 1..n.

    Threshold, median filter, optional erosion (disk), hole filling, then the
    distance-transform watershed of :func:`nucli.postprocess.split_touching`;
    objects smaller than ``min_area_px`` or larger than ``max_extent`` are dropped.
    """
    from scipy import ndimage as ndi

    from nucli import postprocess as pp

    prob = np.asarray(prob, dtype=np.float32)
    mask = prob >= params.threshold
    if params.median > 1:
        mask = ndi.median_filter(mask.astype(np.uint8), size=int(params.median)) > 0
    if params.erosion > 0:
        r = int(params.erosion)
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        mask = ndi.binary_erosion(mask, structure=(yy * yy + xx * xx) <= r * r)
    if not mask.any():
        return np.zeros(prob.shape, np.int32)
    mask = pp.fill_holes(mask)
    labels = pp.split_touching(mask, min_distance=params.min_distance_px, h=params.h)
    return pp.filter_sizes(labels, min_area=params.min_area_px, max_extent=max_extent)


def tiles_to_tensor(tiles: np.ndarray):
    """(B, H, W, 3) uint8 (or (B, H, W) gray) -> float32 tensor (B, 3, H, W) in [0, 1]."""
    import torch

    from nucli.postprocess import as_rgb

    tiles = np.asarray(tiles)
    if tiles.ndim == 2 or (tiles.ndim == 3 and tiles.shape[-1] in (3, 4) and tiles.shape[0] > 4):
        tiles = tiles[None]
    if tiles.ndim not in (3, 4) or min(tiles.shape[1:3]) < 1:
        raise InputError(f"expected tiles of shape (B, H, W, 3) or (B, H, W), got {tiles.shape}")
    rgb = np.stack([as_rgb(t) for t in tiles]).astype(np.float32)
    if tiles.dtype != np.uint8:
        top = float(rgb.max()) if rgb.size else 1.0
        rgb = rgb * (255.0 / top) if top > 255.0 else rgb
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(0, 3, 1, 2) / 255.0))


def segment_probability(net: Any, x: Any, scale: float = 1.0, stride: int = 8) -> Any:
    """Run segmentor ``net`` on (B, 3, H, W) in [0, 1]; returns (B, H, W) nucleus probability (torch)."""
    import torch
    import torch.nn.functional as F

    from nucli.models.gensegnet.generator import pad_to

    h, w = x.shape[-2:]
    if abs(scale - 1.0) > 1e-6:
        size = (max(int(round(h * scale)), 1), max(int(round(w * scale)), 1))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1.0)
    xp, (sh, sw) = pad_to(x, stride)
    with torch.inference_mode():
        logits = net(xp)[:, :1, :sh, :sw]
    if logits.shape[-2:] != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[:, 0]


class SpatialPrior(Method):
    """Built once per worker by :func:`build`; ``infer`` runs S, ``postprocess`` is CPU-only."""

    def __init__(self, config: MethodConfig, segmentor: Any, device: str = "cpu"):
        super().__init__(config)
        self.segmentor = segmentor.eval()
        self.device = device
        params = config.params or {}
        self.scale = float(params.get("scale", 1.0))
        self.params = PostprocessParams.from_dict(params.get("postprocess"))
        self.stride = int(getattr(segmentor, "stride", 8))

    def infer(self, tiles: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, H, W) float32 nucleus probabilities."""
        x = tiles_to_tensor(tiles).to(self.device)
        return segment_probability(self.segmentor, x, self.scale, self.stride).cpu().numpy()

    def postprocess(self, raw: np.ndarray) -> list[TileResult]:
        ext = float(self.config.max_nucleus_diameter_px)
        return [TileResult(labels=instances_from_prob(p, self.params, ext)) for p in np.asarray(raw)]


def instance_norm(module: Any) -> Any:
    """Replace every BatchNorm2d of ``module`` by an affine InstanceNorm2d (in place; returns it).

    Adversarially trained, S reaches its decisions with small logits; batch
    statistics that lag behind the weights (BatchNorm's running averages)
    flip them at inference. Instance normalisation behaves the same in
    training and inference (as in CycleGAN's generators).
    """
    from torch import nn

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.InstanceNorm2d(child.num_features, affine=True))
        else:
            instance_norm(child)
    return module


def unet(widths: Any, in_ch: int, n_classes: int, norm: str = "instance") -> Any:
    """The GeNSeg-Net U-Net (:mod:`nucli.models.gensegnet.unet`) with instance or batch normalisation."""
    from nucli.models.gensegnet.unet import UNet

    net = UNet(tuple(int(w) for w in widths), in_ch=in_ch, n_classes=n_classes)
    return instance_norm(net) if norm == "instance" else net


def segmentor_from_params(params: dict[str, Any]):
    """The U-Net segmentor (3 input channels, 1 logit) described by a config's params."""
    try:
        seg = params["segmentor"]
        return unet(seg["widths"], 3, 1, seg.get("norm", "instance"))
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"spatialprior config lacks a valid segmentor description ({exc})") from None


def build(config: MethodConfig, weights_path: Path | None, device: str = "cpu") -> SpatialPrior:
    """Registry builder: load the segmentor once, return a ready method."""
    import torch

    from nucli.models.weights_io import load_into, load_weights

    if weights_path is None:
        raise WeightsError("spatialprior needs weights; train them with `nucli train --method spatialprior "
                           "--images DIR --prior-masks DIR -o OUT` and pass --weights")
    tensors, stored = load_weights(Path(weights_path), METHOD)
    params = {**(config.params or {}), **dict(stored.get("params") or {})}
    data = config.to_dict()
    for key in ("mpp", "nucleus_diameter_px", "max_nucleus_diameter_px"):
        if key in stored:
            data[key] = stored[key]
    data["params"] = params
    config = MethodConfig.from_dict(data)
    net = segmentor_from_params(params)
    load_into(net, {k[len("segmentor."):]: v for k, v in tensors.items() if k.startswith("segmentor.")},
              weights_path, METHOD)
    torch_device = torch.device(device)
    net.to(torch_device)
    return SpatialPrior(config, net, device=str(torch_device))


def _build(config: MethodConfig, weights: Path | None, device: str) -> Method:
    return build(config, weights, device)


SPEC = register(
    MethodSpec(
        name=METHOD,
        summary="Unsupervised: U-Net learnt adversarially from unpaired masks of another stain (spatial priors).",
        config=CONFIG,
        builder=_build,
        weights_file="spatialprior_cpu.safetensors",
        weights_sha256="ad635d133947993a1e6c1f690bc689fb02e4481c6eb415b29fd67e189bb3daa3",
        needs_weights=True,
    )
)
