"""Weights are data, not code: safetensors files with nucli metadata.

A nucli weights file is a safetensors file whose metadata holds
``nucli.method`` (the method name), ``nucli.config`` (JSON of the
:class:`~nucli.models.base.MethodConfig`) and ``nucli.format``. Loading never
unpickles anything; a file of another method, with other tensor shapes, or not
a safetensors file at all is a one-line :class:`~nucli.errors.WeightsError`.
"""

from __future__ import annotations

import json
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
