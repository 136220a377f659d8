"""nucli: find every cell nucleus in whole-slide microscopy images."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("nucli")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
