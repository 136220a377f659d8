"""Helpers shared by the scaling benchmarks: hardware and load, synthetic stores, methods to time."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def hardware() -> dict[str, Any]:
    """CPU model, cores, memory, load, library versions: what a number was measured on."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb,
                            "python": platform.python_version(), "load_1_5_15": load()}
    for mod in ("torch", "dask", "distributed", "zarr"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def tissue_image(width: int, height: int, seed: int = 3) -> np.ndarray:
    """A synthetic H&E-like picture that is tissue everywhere (one island larger than the picture)."""
    from nucli.synthetic import Island, SyntheticTissue

    big = Island(width / 2, height / 2, width * 0.75, height * 0.75)
    return SyntheticTissue(width, height, (big,), seed=seed).render(0, 0, width, height, 1.0)


def tissue_store(path: Path, tiles_per_side: int, tile: int = 512, overlap: int = 64, seed: int = 3):
    """A run store of ``tiles_per_side``^2 full tissue tiles (``tile`` px, ``overlap`` px)."""
    from nucli.pipeline import store_from_array

    side = tiles_per_side * (tile - overlap) + overlap
    return store_from_array(path, tissue_image(side, side, seed), tile_size=tile, overlap=overlap, source_mpp=0.5,
                            fingerprint=f"bench-{seed}-{side}", overwrite=True)


def untrained_gensegnet_weights(path: Path) -> Path:
    """GeNSeg-Net's shipped architecture with random (seeded) weights, as a weights file.

    Only for timing when the shipped weights are missing: speed does not depend on weight values.
    """
    import torch

    from nucli.models.gensegnet import CONFIG
    from nucli.models.gensegnet.method import networks_from_params
    from nucli.models.weights_io import save_weights

    torch.manual_seed(0)
    gen, unet = networks_from_params(CONFIG.params)
    tensors = {f"generator.{k}": v.contiguous() for k, v in gen.state_dict().items()}
    tensors.update({f"unet.{k}": v.contiguous() for k, v in unet.state_dict().items()})
    return save_weights(Path(path), tensors, "gensegnet", CONFIG.to_dict(), {"note": "untrained, for timing only"})


def methods_to_time(names: list[str] | None, scratch: Path) -> list[dict[str, Any]]:
    """Every registered method whose weights exist (or that needs none), as {name, weights, note, method}.

    GeNSeg-Net without shipped weights is timed with its untrained network
    (labelled so); other methods without weights are listed as skipped.
    """
    from nucli.errors import NucliError, WeightsError
    from nucli.models.registry import available, build_method

    out = []
    for name, spec in sorted(available().items()):
        if names and name not in names:
            continue
        weights = None
        if spec.weights_path is None:
            note = "no weights needed"
        elif spec.weights_path.exists():
            note = "shipped weights"
        else:
            note = None
        try:
            method = build_method(name)
            note = note or "no weights needed"
        except WeightsError:
            if name != "gensegnet":
                out.append({"name": name, "skipped": "no shipped weights"})
                continue
            weights = untrained_gensegnet_weights(scratch / "gensegnet_untrained.safetensors")
            method = build_method(name, weights=weights)
            note = "UNTRAINED network of the shipped preset (weights not shipped yet); speed only"
        except NucliError as exc:
            out.append({"name": name, "skipped": str(exc)})
            continue
        out.append({"name": name, "weights": str(weights) if weights else None, "note": note, "method": method})
    return out


class Timer:
    """Wall seconds and CPU seconds (this process, all threads) of a block.

    On a machine shared with other work the wall time grows with the load;
    the CPU time hardly does, so both are reported.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu = 0.0

    def __enter__(self) -> "Timer":
        self._t = time.perf_counter()
        self._c = time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._t
        self.cpu = time.process_time() - self._c
