"""Segmentation methods behind one interface, looked up by name in a registry."""

from nucli.models.base import Method, MethodConfig, TileResult
from nucli.models.registry import DEFAULT_METHOD, available, build_method, get_spec

__all__ = ["Method", "MethodConfig", "TileResult", "DEFAULT_METHOD", "available", "build_method", "get_spec"]
