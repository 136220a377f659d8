"""GeNSeg-Net as a nucli method: enhancement generator -> 3-class U-Net -> body-seeded watershed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from nucli.errors import InputError, WeightsError
from nucli.models.base import Method, MethodConfig, TileResult
from nucli.models.gensegnet.postprocess import PostprocessParams, instances_from_probs

log = logging.getLogger("nucli.gensegnet")

METHOD = "gensegnet"


class GenSegNet(Method):
    """Built once per worker by :func:`build`; ``infer`` is batched, ``postprocess`` is CPU-only."""

    def __init__(self, config: MethodConfig, generator: Any, unet: Any, device: str = "cpu",
                 bf16: bool = False):
        super().__init__(config)
        self.generator = generator.eval()
        self.unet = unet.eval()
        self.device = device
        self.bf16 = bf16
        # oneDNN convolutions run 1.6-1.9x faster on NHWC tensors on CPU (benchmarks/bench_gensegnet.py)
        self.channels_last = str(device) == "cpu"
        if self.channels_last:
            import torch

            self.generator.to(memory_format=torch.channels_last)
            self.unet.to(memory_format=torch.channels_last)
        pp = dict(config.params.get("postprocess") or {})
        pp.setdefault("max_diameter", int(config.max_nucleus_diameter_px))
        self.params = PostprocessParams.from_dict(pp)
        self.stride = int(np.lcm(generator.stride, unet.stride))

    # ------------------------------------------------------------ model steps
    def _to_tensor(self, x: np.ndarray):
        """(B, H, W) -> (B, 1, H, W) tensor; (B, C, H, W) as it is."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return (t[:, None] if t.ndim == 3 else t).to(self.device)

    def _run(self, net: Any, x):
        import torch

        from nucli.models.gensegnet.generator import pad_to

        x, (h, w) = pad_to(x, self.stride)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.amp_dtype is not None:  # a GPU in mixed precision
                with torch.autocast(x.device.type, dtype=self.amp_dtype):
                    y = net(x)
                y = y.float()
            elif self.bf16:
                fast = self._bf16_copy(net) if self.channels_last and net is self.unet else None
                if fast is not None:  # bfloat16 throughout, batch norms folded (nucli.models.cpu_bf16)
                    y = fast(x.to(torch.bfloat16))
                else:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        y = net(x)
                y = y.float()
            else:
                y = net(x)
        return y[..., :h, :w].contiguous()

    def _bf16_copy(self, net: Any) -> Any:
        """The bfloat16 inference copy of ``net`` (made once; None for a network without weights).

        Used for the U-Net only: on the CMU slide the copy of the U-Net kept the nuclei of autocast
        (F1 0.998 at IoU 0.5), while one of the generator moved them more (F1 0.994; probably its
        residual trunk, which then adds up in bfloat16 over 9 blocks).
        """
        cache = self.__dict__.setdefault("_bf16_nets", {})
        if id(net) not in cache:
            from nucli.models.cpu_bf16 import inference_copy

            cache[id(net)] = inference_copy(net) if any(True for _ in net.parameters()) else None
        return cache[id(net)]

    def enhance(self, tiles: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB (or (B, H, W) gray) -> (B, H, W) float32 enhanced images in [0, 1]."""
        from nucli.models.gensegnet.preprocess import normalize_batch

        tiles = _check_tiles(tiles)
        x = normalize_batch(tiles, self.in_channels)
        return self._run(self.generator, self._to_tensor(x))[:, 0].cpu().numpy()

    @property
    def in_channels(self) -> int:
        """Input channels of the generator: 1 (gray) or 3 (gray, red, blue; see ``preprocess``)."""
        gen = (self.config.params or {}).get("generator") or {}
        return int(gen.get("in_channels", 1))

    def classify(self, enhanced: np.ndarray) -> np.ndarray:
        """(B, H, W) enhanced images (float in [0, 1] or uint8) -> (B, 3, H, W) float32 probabilities."""
        e = np.asarray(enhanced)
        if e.ndim == 2:
            e = e[None]
        e = e.astype(np.float32) / 255.0 if e.dtype == np.uint8 else e.astype(np.float32)
        return self._run(self.unet, self._to_tensor(e)).softmax(dim=1).cpu().numpy()

    def infer(self, tiles: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 class probabilities (background, body, edge).

        ``params.tta`` (default off): the mean of the probabilities over the identity, horizontal,
        vertical and double flip of each tile (flip, enhance and classify, flip back): 4x the
        network time.
        """
        if not self.config.params.get("tta"):
            return self.classify(self.enhance(tiles))
        tiles = _check_tiles(tiles)
        total = None
        for dims in ((), (2,), (1,), (1, 2)):  # tile axes (B, H, W[, C])
            t = np.ascontiguousarray(np.flip(tiles, dims)) if dims else tiles
            p = self.classify(self.enhance(t))
            p = np.flip(p, tuple(d + 1 for d in dims)) if dims else p  # (B, 3, H, W)
            total = p.copy() if total is None else total + p
        return (total / 4.0).astype(np.float32)

    def postprocess(self, raw: np.ndarray) -> list[TileResult]:
        return [TileResult(labels=instances_from_probs(p, self.params)) for p in np.asarray(raw)]

    #: ``segment(t)`` is ``postprocess_tiles(infer(t), t)``: a pipeline may run the two steps apart
    splits_segment = True
    #: ``params.tta``: flip test-time augmentation (:meth:`infer`)
    supports_tta = True

    def segment(self, tiles: np.ndarray) -> list[TileResult]:
        """Whole images (``nucli evaluate --dataset``) or tiles: as in a slide run, pale brightfield nuclei dropped.

        In a slide run the same filter is applied again while stitching, with the slide's modality.
        """
        tiles = _check_tiles(tiles)
        return self.postprocess_tiles(self.infer(tiles), tiles)

    def postprocess_tiles(self, raw: np.ndarray, tiles: np.ndarray) -> list[TileResult]:
        """:meth:`postprocess`, then the objects too pale to be stained nuclei (brightfield) dropped."""
        from nucli.postprocess import as_rgb, drop_pale

        tiles = _check_tiles(tiles)
        results = self.postprocess(raw)
        min_od = float(self.config.params.get("min_hematoxylin_od") or 0.0)
        if min_od > 0:
            for r, t in zip(results, tiles):
                r.labels = drop_pale(r.labels, as_rgb(t), min_od)
        return results

    def postprocess_resampled(self, raw: np.ndarray, rgb: np.ndarray) -> np.ndarray:
        """The class probabilities resampled bilinearly to ``rgb``'s pixels, then the watershed with
        its lengths and areas in the image's pixels; pale brightfield objects dropped as in
        :meth:`postprocess_tiles`."""
        from nucli.postprocess import as_rgb, drop_pale, resample_raw

        rgb = as_rgb(np.asarray(rgb))
        prob, s = resample_raw(raw, rgb.shape[:2])
        labels = instances_from_probs(prob, self.params.scaled(s))
        min_od = float(self.config.params.get("min_hematoxylin_od") or 0.0)
        return drop_pale(labels, rgb, min_od) if min_od > 0 else labels

    def segment_enhanced(self, enhanced: np.ndarray) -> list[TileResult]:
        """Segment stored enhanced tiles ((B, H, W) uint8 or float) without re-running the generator."""
        return self.postprocess(self.classify(enhanced))


def enhanced_to_uint8(enhanced: np.ndarray) -> np.ndarray:
    """Enhanced images in [0, 1] -> uint8 (what ``nucli enhance`` stores)."""
    return np.clip(np.rint(np.asarray(enhanced) * 255.0), 0, 255).astype(np.uint8)


def _check_tiles(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim == 2 or (tiles.ndim == 3 and tiles.shape[-1] in (3, 4) and tiles.shape[0] > 4):
        tiles = tiles[None]
    if tiles.ndim not in (3, 4) or tiles.shape[1] < 1 or tiles.shape[2] < 1:
        raise InputError(f"expected tiles of shape (B, H, W, 3) or (B, H, W), got {tiles.shape}")
    return tiles


def networks_from_params(params: dict[str, Any]):
    """Build (generator, unet) from the architecture recorded in a config's params.

    ``generator: null`` builds the segmentation stage alone (the ablation without
    enhancement): the U-Net then sees the normalised gray image itself.
    """
    from nucli.models.gensegnet.generator import Generator, PassThrough
    from nucli.models.gensegnet.unet import UNet

    try:
        gen = PassThrough() if params.get("generator") is None else Generator(**params["generator"])
        unet = UNet(tuple(params["unet"]["widths"]))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:  # torch: impossible sizes
        why = " ".join(str(exc).split())[:200]
        raise WeightsError(f"gensegnet config lacks a valid network description ({why})") from None
    return gen, unet


def build(config: MethodConfig, weights_path: Path | None, device: str = "cpu") -> GenSegNet:
    """Registry builder: load weights once, return a ready method."""
    import torch

    from nucli.models.weights_io import load_into, load_weights

    if weights_path is None:
        raise WeightsError("gensegnet needs weights; pass --weights FILE or reinstall nucli (shipped weights missing)")
    tensors, stored = load_weights(Path(weights_path), METHOD)
    # the network, its tuned thresholds and its preset travel with the weights file
    params = {**config.params, **dict(stored.get("params") or {})}
    data = adopt_working_scale(config.to_dict(), stored)
    data["params"] = params
    config = MethodConfig.from_dict(data)
    gen, unet = networks_from_params(params)
    load_into(gen, {k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")},
              weights_path, METHOD)
    load_into(unet, {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}, weights_path, METHOD)
    torch_device = torch.device(device)
    gen.to(torch_device)
    unet.to(torch_device)
    return GenSegNet(config, gen, unet, device=str(torch_device), bf16=use_bf16(params.get("bf16", False), torch_device))


def adopt_working_scale(data: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """Weights trained at one working scale (``params.working_scale``) carry their pixel size and
    typical nucleus diameter: those win over the registry's, since the network learnt at them."""
    ws = (stored.get("params") or {}).get("working_scale")
    if not isinstance(ws, dict):  # older weights: the pixel size and nucleus size their config recorded
        ws = {"mpp": stored.get("mpp"), "reference_diameter_px": stored.get("nucleus_diameter_px")}
    for key, field in (("mpp", "mpp"), ("reference_diameter_px", "nucleus_diameter_px")):
        v = ws.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < float(v) < 1e3:
            data[field] = float(v)
    return data


def use_bf16(setting: Any, device: Any) -> bool:
    """``bf16`` setting -> whether to autocast: True/False, or "auto" = on CPUs with native bfloat16.

    On DSB2018 test, bfloat16 autocast changed AJI/PQ by < 0.001 and halved the network time on
    an AVX-512 BF16 CPU; without native support it would be slower, so "auto" leaves it off.
    """
    if isinstance(setting, str):
        if setting != "auto":
            return setting.lower() in ("1", "true", "yes")
        if getattr(device, "type", str(device)) != "cpu":
            return False
        import torch

        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return bool(setting)
