"""Reading and writing label images for evaluation.

Supported inputs (each a 2-D image of integer object ids, 0 = background):

* ``.tif``/``.tiff`` (tifffile), ``.png`` (imageio), ``.npy`` (NumPy, no pickles);
* Zarr: an array, or a group holding an array named ``labels``. An attribute
  ``{"nucli": {"kind": "label-image", "downsample": d}}`` (on the array or the
  group) means the labels are at ``1/d`` of level-0 resolution; they are then
  scaled (nearest neighbour) onto the ground-truth grid;
* GeoJSON (see :mod:`nucli.evaluation.geojson`), rasterised onto the grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nucli.errors import InputError

log = logging.getLogger("nucli.evaluation")

RASTER_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
GEOJSON_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz")
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


def stem_of(path: Path) -> str:
    """File name without its format suffix (``a.geojson.gz`` -> ``a``)."""
    name = path.name
    if name.lower().endswith((".geojson.gz", ".json.gz")):
        return name[: -len(".gz")].rsplit(".", 1)[0]
    return path.stem


def is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in ZARR_MARKERS)


def kind_of(path: Path) -> str:
    """'raster', 'zarr', 'geojson' or 'dir' (a directory of such files)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        if is_zarr(path):
            return "zarr"
        if path.suffix.lower() == ".zarr":
            raise InputError(f"{path} is named .zarr but holds no Zarr metadata (zarr.json/.zarray/.zgroup)")
        return "dir"
    suffix = path.suffix.lower()
    if suffix in RASTER_SUFFIXES:
        return "raster"
    if path.name.lower().endswith(GEOJSON_SUFFIXES):
        return "geojson"
    raise InputError(
        f"{path}: unsupported file type '{suffix}'; use a label image (.tif, .png, .npy), "
        "a Zarr label image, or GeoJSON (.geojson/.json, optionally .gz)"
    )


@dataclass
class LabelImage:
    """A label image as read, before it is put on the ground-truth grid."""

    labels: np.ndarray
    downsample: float = 1.0  # level-0 px per label px


def validate_labels(arr: np.ndarray, path: Path | str) -> np.ndarray:
    """Check ``arr`` is a usable 2-D integer label image; return it (integer dtype).

    Singleton axes are dropped. Floating-point images are accepted only when
    every value is a whole number.
    """
    arr = np.asarray(arr)
    if arr.ndim > 2:
        arr = np.squeeze(arr)
    if arr.ndim != 2:
        extra = " (looks like a colour image; a label image has one integer id per pixel)" if arr.ndim == 3 else ""
        raise InputError(f"{path}: expected a 2-D label image, got shape {tuple(arr.shape)}{extra}")
    if arr.dtype == bool:
        raise InputError(
            f"{path}: is a binary mask (bool), not instance labels; give each nucleus its own integer id"
        )
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr))):
            raise InputError(
                f"{path}: label image holds non-integer values (dtype {arr.dtype}); "
                "a label image must hold integer nucleus ids"
            )
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{path}: label image has non-integer dtype {arr.dtype}; integer nucleus ids are needed")
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and arr.min() < 0:
        raise InputError(f"{path}: label image holds negative ids; ids must be >= 0 (0 = background)")
    return arr


def read_raster(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        elif suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            import imageio.v3 as iio

            arr = iio.imread(path)
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise InputError(f"{path}: cannot read image ({_short(exc)})") from None
    except Exception as exc:  # readers raise many types for corrupt files
        raise InputError(f"{path}: cannot read image ({_short(exc)})") from None
    return validate_labels(arr, path)


def read_zarr(path: Path) -> LabelImage:
    """A Zarr label image: an array, or a group with an array ``labels``."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises many types for broken stores
        raise InputError(f"{path}: not a readable Zarr array or group ({_short(exc)})") from None
    attrs = {}
    if isinstance(node, zarr.Group):
        attrs.update(dict(node.attrs.get("nucli") or {}))
        if "labels" not in node:
            raise InputError(f"{path}: Zarr group has no array named 'labels'")
        node = node["labels"]
        if isinstance(node, zarr.Group):
            raise InputError(f"{path}: 'labels' in this Zarr group is a group, not an array")
        if node.ndim == 3 and "tile_size" in attrs:
            raise InputError(
                f"{path} is a run store holding per-tile labels; export a global label image "
                "with `nucli stitch` and evaluate that"
            )
    attrs.update(dict(node.attrs.get("nucli") or {}))
    downsample = attrs.get("downsample", 1.0) if attrs.get("kind", "label-image") == "label-image" else 1.0
    try:
        downsample = float(downsample if downsample is not None else 1.0)
    except (TypeError, ValueError):
        raise InputError(f"{path}: attribute nucli.downsample is not a number ({downsample!r})") from None
    if not np.isfinite(downsample) or downsample <= 0:
        raise InputError(f"{path}: attribute nucli.downsample must be > 0 (got {downsample})")
    if node.ndim not in (2, 3):
        raise InputError(f"{path}: expected a 2-D label array, got shape {tuple(node.shape)}")
    return LabelImage(validate_labels(node[...], path), downsample)


def to_grid(img: LabelImage, shape: tuple[int, int], path: Path, gt_path: Path) -> np.ndarray:
    """Put a label image on the ground-truth grid ``shape`` (rows, cols).

    At downsample 1 the shapes must match. Otherwise the labels are scaled by
    nearest neighbour: GT pixel ``y`` takes label row ``floor((y + 0.5) / d)``.
    """
    labels = img.labels
    h, w = shape
    if img.downsample == 1.0:
        if labels.shape != tuple(shape):
            raise InputError(
                f"{path}: size {labels.shape[1]}x{labels.shape[0]} (WxH) differs from the ground truth "
                f"{gt_path} ({w}x{h})"
            )
        return labels
    d = img.downsample
    if abs(labels.shape[0] - h / d) > 1 or abs(labels.shape[1] - w / d) > 1:
        raise InputError(
            f"{path}: size {labels.shape[1]}x{labels.shape[0]} at downsample {d:g} does not cover the ground "
            f"truth {gt_path} ({w}x{h}; expected about {w / d:.0f}x{h / d:.0f})"
        )
    rows = np.minimum(((np.arange(h) + 0.5) / d).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) / d).astype(np.int64), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


def write_labels_tif(labels: np.ndarray, path: Path) -> None:
    """Write a label image as a zlib-compressed TIFF, atomically."""
    import tifffile

    labels = np.asarray(labels)
    dtype = np.uint16 if labels.size == 0 or labels.max() < 65536 else np.uint32
    from nucli.export._atomic import AtomicFile

    out = AtomicFile(Path(path), binary=True)
    try:
        tifffile.imwrite(out.handle, labels.astype(dtype), compression="zlib")
        out.commit()
    except BaseException:
        out.discard()
        raise


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.parent and not path.parent.is_dir():
        raise InputError(f"cannot write {path}: {path.parent} is a file, not a folder")
    from nucli.export._atomic import AtomicFile

    out = AtomicFile(path, newline="")
    try:
        out.handle.write(text)
        out.commit()
    except BaseException:
        out.discard()
        raise


def read_rgb(path: Path) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB (grey replicated, alpha dropped)."""
    try:
        import imageio.v3 as iio

        img = np.asarray(iio.imread(path))
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read image ({_short(exc)})") from None
    if img.ndim == 3 and img.shape[2] in (1, 2):  # grey (+ alpha)
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise InputError(f"{path}: expected a grey or RGB image, got shape {tuple(img.shape)}")
    img = img[..., :3]
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.integer):
            img = (img.astype(np.float64) * (255.0 / np.iinfo(img.dtype).max)).round().astype(np.uint8)
        else:
            img = (np.clip(img.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(img)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
