"""Weights are data, not code: safetensors files with nucli metadata.

A nucli weights file is a safetensors file whose metadata holds
``nucli.method`` (the method name), ``nucli.config`` (JSON of the
:class:`~nucli.models.base.MethodConfig`) and ``nucli.format``. Loading never
unpickles anything; a file of another method, with other tensor shapes, or not
a safetensors file at all is a one-line :class:`~nucli.errors.WeightsError`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from nucli.errors import WeightsError

FORMAT = "1"


def save_weights(path: Path, tensors: dict[str, Any], method: str, config: dict[str, Any],
                 extra: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (name -> torch.Tensor) atomically to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"nucli.method": method, "nucli.config": json.dumps(config, sort_keys=True), "nucli.format": FORMAT}
    metadata.update(extra or {})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """Metadata of a nucli weights file (validates that it is one)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if path.is_dir():
        raise WeightsError(f"weights path is a directory, expected a .safetensors file: {path}")
    if path.stat().st_size < 8:
        raise WeightsError(f"weights file is empty or truncated: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception:
        raise WeightsError(
            f"{path} is not a valid safetensors weights file (corrupt, truncated, or another format "
            "such as a pickle; nucli never loads pickles)"
        ) from None
    if "nucli.method" not in meta:
        raise WeightsError(f"{path} is a safetensors file but not nucli weights (no nucli.method metadata)")
    return meta


_BF16_WORDS = ("auto", "true", "false", "yes", "no", "1", "0")
_NUMBERS: dict[str, tuple[float, float, bool]] = {
    # name: (lowest, highest, whole numbers only)
    "mpp": (0.01, 20.0, False),
    "nucleus_diameter_px": (1e-3, 1e3, False),
    "reference_diameter_px": (1e-3, 1e3, False),
    "max_nucleus_diameter_px": (1, 8192, True),
    "tile_size": (16, 8192, True),
    "overlap": (0, 8192, True),
    "batch_size": (1, 4096, True),
    "min_area": (0, 1e6, False),
    "min_seed_area": (0, 1e6, False),
    "min_area_px": (0, 1e6, False),
    "min_distance_px": (0, 1e3, False),
    "marker_radius": (0, 1e3, False),
    "contour_thickness": (0, 1e3, False),
    "erosion": (0, 1e3, False),
    "median": (0, 1e3, False),
    "split_h": (0, 1e3, False),
    "h": (0, 1e3, False),
    "neck_depth": (0, 1e3, False),
    "band_bias": (-100, 100, False),
    "min_hematoxylin_od": (0, 10, False),
    "ratio": (1e-3, 1e3, False),
}
"""Numeric settings a weights file's config may carry (at any depth of ``params``), with their ranges; names
ending in ``threshold`` are probabilities in [0, 1]."""
_FLAGS = ("tta", "input_skip", "shrink")


def _known(key: str) -> bool:
    return key == "bf16" or key in _FLAGS or key in _NUMBERS or key.endswith("threshold")


def _bad_value(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for setting ``key`` (a few words), or None (fine, or not a known setting)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "bf16":
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in _BF16_WORDS):
            return None
        return 'expected true, false or "auto"'
    if key in _FLAGS:
        return None if isinstance(value, bool) else "expected true or false"
    if key.endswith("threshold"):
        lo, hi, whole = 0.0, 1.0, False
    elif key in _NUMBERS:
        lo, hi, whole = _NUMBERS[key]
    else:
        return None
    what = f"{'a whole number' if whole else 'a number'} between {lo:g} and {hi:g}"
    if not is_number or not math.isfinite(value) or not lo <= value <= hi or (whole and value != int(value)):
        return f"expected {what}"
    return None


def check_config(config: dict[str, Any], path: Path | str) -> None:
    """Refuse a weights file whose config holds a known setting of the wrong type or out of its range
    (a threshold that is text, an area that is a list, ``bf16`` an object): one line naming the file and key."""

    def walk(node: dict[str, Any], prefix: str, top: bool) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and not _known(str(key)):
                if top and key != "params":
                    continue
                walk(value, name + ".", False)
                continue
            problem = _bad_value(str(key), value)
            if problem:
                shown = json.dumps(value)  # as the file spells it (NaN too)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                raise WeightsError(f"{path}: the config stored in the weights file has {name} = {shown}, "
                                   f"{problem}; the file is damaged or was edited (use other weights)")

    try:
        walk(config, "", True)
    except RecursionError:
        raise WeightsError(f"{path}: the config stored in the weights file is nested too deeply; the file is "
                           "damaged") from None


def load_weights(path: Path, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load tensors and config of a weights file made for ``method``."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    found = meta.get("nucli.method")
    if found != method:
        raise WeightsError(f"{path} holds weights for method '{found}', not '{method}'; pass --method {found}")
    try:
        config = json.loads(meta.get("nucli.config", "{}"))
    except (json.JSONDecodeError, RecursionError):
        raise WeightsError(f"{path}: the config stored in the weights file is not valid JSON") from None
    if not isinstance(config, dict) or not isinstance(config.get("params", {}), (dict, type(None))):
        raise WeightsError(f"{path}: the config stored in the weights file is not a JSON object with a 'params' "
                           "object; the file is damaged")
    check_config(config, path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception:
        raise WeightsError(f"{path} is corrupt or truncated (tensor data unreadable)") from None
    return tensors, config


def load_into(module: Any, tensors: dict[str, Any], path: Path | str, method: str) -> None:
    """Copy ``tensors`` into a torch module; clear error when names/shapes differ."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise WeightsError(
            f"{path} does not fit the '{method}' network ({what}); was it trained with another preset?"
        )
    for key, value in own.items():
        if tuple(value.shape) != tuple(tensors[key].shape):
            raise WeightsError(
                f"{path} does not fit the '{method}' network: '{key}' has shape "
                f"{tuple(tensors[key].shape)}, expected {tuple(value.shape)} (another preset?)"
            )
    module.load_state_dict(tensors, strict=True)
