"""nucli: find every cell nucleus in whole-slide microscopy images.

Python API (imported lazily, so ``import nucli`` stays light)::

    labels, table = nucli.segment_array(image, method="watershed")
    nucli.slide_info("slide.svs")      # what `nucli info` shows
    nucli.method_catalog()             # what `nucli models` shows
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("nucli")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

_API = ("segment_array", "slide_info", "method_catalog")


def __getattr__(name: str):
    if name in _API:
        from nucli import api

        return getattr(api, name)
    raise AttributeError(f"module 'nucli' has no attribute {name!r}")


__all__ = ["__version__", *_API]
