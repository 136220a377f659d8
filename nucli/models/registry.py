"""One registry: method name -> builder, default config, shipped weights.

No silent fallbacks: an unknown name is an error listing the known ones; a
weights file for another method or of other shapes is an error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nucli.errors import UsageError, WeightsError
from nucli.models.base import Method, MethodConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_METHOD = "gensegnet"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    config: MethodConfig
    # builder(config, weights_path or None, device) -> Method
    builder: Callable[[MethodConfig, Path | None, str], Method]
    weights_file: str | None = None  # file name in nucli/models/weights/
    weights_sha256: str | None = None
    needs_weights: bool = False

    @property
    def weights_path(self) -> Path | None:
        return WEIGHTS_DIR / self.weights_file if self.weights_file else None

    @property
    def card_path(self) -> Path | None:
        if not self.weights_file:
            return None
        return WEIGHTS_DIR / (self.weights_file.split(".")[0] + ".md")


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtin() -> None:
    # Importing a method module registers it. Keep these imports light: heavy
    # libraries (torch) are imported inside builders.
    for mod in ("watershed", "gensegnet", "harunet", "mcf", "spatialprior"):
        try:
            __import__(f"nucli.models.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"nucli.models.{mod}":
                raise


_BUILTINS_LOADED = False


def available() -> dict[str, MethodSpec]:
    # load the built-in methods once, even when one of them was imported (and so
    # registered) directly before the first look-up
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        _load_builtin()
    return dict(_REGISTRY)


def get_spec(name: str | None) -> MethodSpec:
    """The method ``name`` (None: the default); an empty or unknown name is a usage error listing the known ones."""
    name = DEFAULT_METHOD if name is None else name
    specs = available()
    if name not in specs:
        known = ", ".join(sorted(specs)) or "(none)"
        if not name.strip():
            raise UsageError(f"--method is empty; name one of the known methods: {known} (or leave --method out "
                             f"for the default, {DEFAULT_METHOD})")
        raise UsageError(f"unknown method '{name}'; known methods: {known}")
    return specs[name]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_method(
    name: str | None = None,
    weights: Path | None = None,
    device: str = "cpu",
    **overrides: Any,
) -> Method:
    """Build a ready-to-use method. ``overrides`` replace config fields; ``tta=True`` turns on flip
    test-time augmentation (methods with ``supports_tta``; the mean over the 4 flips of each tile)."""
    spec = get_spec(name)
    config = spec.config
    tta = overrides.pop("tta", None)
    if overrides:
        data = config.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in data:
                raise UsageError(f"method '{spec.name}' has no setting '{key}'")
            data[key] = value
        config = MethodConfig.from_dict(data)
    path = Path(weights) if weights is not None else spec.weights_path
    if weights is None and spec.weights_path is not None:
        if not spec.weights_path.exists():
            if spec.needs_weights:
                raise WeightsError(
                    f"method '{spec.name}' has no shipped weights in this install; "
                    f"train them with `nucli train --method {spec.name}` and pass --weights"
                )
            path = None
        elif spec.weights_sha256 and sha256_of(spec.weights_path) != spec.weights_sha256:
            raise WeightsError(f"shipped weights {spec.weights_path} fail their SHA-256 check; reinstall nucli")
    method = spec.builder(config, path, device)
    if tta is not None:
        if not getattr(method, "supports_tta", False):
            if tta:
                raise UsageError(f"method '{spec.name}' has no test-time augmentation (--tta); "
                                 f"it is available for {', '.join(tta_methods())}")
        else:
            method.config = MethodConfig.from_dict({**method.config.to_dict(),
                                                    "params": {**method.config.params, "tta": bool(tta)}})
    return method


#: the methods with flip test-time augmentation (their classes set ``supports_tta``)
TTA_METHODS = ("gensegnet", "harunet")


def tta_methods() -> list[str]:
    return [n for n in TTA_METHODS if n in available()]
