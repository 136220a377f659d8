"""What an output may replace: never an input, and with ``--overwrite`` only what nucli wrote.

Two rules, checked by every command before any work:

1. **An output is never an input.** An output path that is an input, resolves to one
   (a symlink, ``..``, another spelling of the name on a case-insensitive file system,
   a hard link), lies inside an input folder (a run store), or holds an input inside it,
   is a usage error (exit 1): :func:`refuse_inputs`.
2. **``--overwrite`` replaces only what nucli recognisably wrote** (:func:`nucli_wrote`):

   * a Zarr folder whose ``zarr.json`` carries a ``nucli`` attribute (run stores, label images);
   * GeoJSON (plain or gzipped) that starts the way nucli writes it
     (``{"type": "FeatureCollection", "features": [`` then a compact nucli Feature or the end);
   * CSV whose header starts with nucli's first columns (``id,label,centroid_x_px,centroid_y_px``),
     Parquet with those first columns;
   * PNG pictures carrying the text chunk ``Software: nucli`` (overlays, enhanced images);
   * nucli's reports (``nucli evaluate -o``: JSON opening with ``nucli_version``; ``--csv``: a header
     ``image,...,aji,aji_plus,...``);
   * an empty file or an empty folder (nothing to lose).

   Anything else is refused with one line saying what is there (exit 2):
   :func:`check_replaceable`. The marker is in the file itself, so a copied or moved nucli
   output stays recognisable, and no sidecar files are left beside outputs.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterable

from nucli.errors import OutputExistsError, UsageError

PNG_SOFTWARE = "nucli"
"""Value of the PNG ``Software`` text chunk nucli writes into its pictures."""
_GEOJSON_OPEN = b'{"type": "FeatureCollection", "features": ['
_GEOJSON_NEXT = (b'\n{"type":"Feature","id":"', b"\n]}")
_CSV_OPEN = "id,label,centroid_x_px,centroid_y_px"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_REPORT_OPEN = b'{\n  "nucli_version": '


# ---------------------------------------------------------------------- rule 1: never an input
def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _existing_ancestors(path: Path) -> Iterable[Path]:
    """``path`` (when it exists) and every existing folder above it, nearest first."""
    p = Path(os.path.abspath(path))
    while True:
        if p.exists():
            yield p
        if p.parent == p:
            return
        p = p.parent


def _inside(child: Path, folder: Path) -> bool:
    """``child`` is ``folder`` or lies inside it: by resolved path (symlinks, ``..``), or by file
    identity (hard links, another spelling of a name on a case-insensitive file system)."""
    child_r, folder_r = Path(child).resolve(), Path(folder).resolve()
    if child_r == folder_r or folder_r in child_r.parents:
        return True
    return any(_same(a, folder_r) for a in _existing_ancestors(child_r))


def refuse_inputs(outputs: Iterable[tuple[str, Path | None]], inputs: Iterable[tuple[str, Path | None]]) -> None:
    """Usage error when an output is, resolves to, lies inside or holds an input.

    ``outputs`` and ``inputs`` are ``(what, path)`` pairs (``what`` names the option in the
    message, e.g. ``"-o"``, ``"--overlay"``, ``"the slide"``); None paths are skipped.
    """
    ins = [(w, Path(p)) for w, p in inputs if p is not None]
    for what, out in outputs:
        if out is None:
            continue
        out = Path(out)
        for iwhat, inp in ins:
            if not inp.exists() and not inp.is_symlink():
                continue
            if _inside(out, inp):
                how = "is" if _same(out, inp) or Path(out).resolve() == inp.resolve() else "lies inside"
                raise UsageError(f"{what} {out} {how} {iwhat} {inp}; nucli never writes over its input: "
                                 f"choose another {what}")
            if out.exists() and out.is_dir() and _inside(inp, out):
                raise UsageError(f"{what} {out} holds {iwhat} {inp}; nucli never replaces its input: "
                                 f"choose another {what}")


# ---------------------------------------------------------------------- rule 2: only what nucli wrote
def _head(path: Path, n: int = 256) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(n)
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as fh:
                return fh.read(n)
        except (OSError, EOFError):
            return b""
    return data


def _png_is_nucli(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return (im.info or {}).get("Software") == PNG_SOFTWARE
    except Exception:  # noqa: BLE001 - anything unreadable is simply not ours
        return False


def _zarr_attrs(path: Path) -> dict | None:
    meta = path / "zarr.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc.get("attributes") or {} if isinstance(doc, dict) else {}


def nucli_wrote(path: Path) -> bool:
    """True when ``path`` (following a symlink) is something nucli wrote, or empty (see the module docstring)."""
    path = Path(path)
    try:
        if path.is_dir():
            entries = list(path.iterdir())
            if not entries:
                return True
            attrs = _zarr_attrs(path)
            return bool(attrs) and isinstance(attrs.get("nucli"), dict)
        if not path.is_file():
            return False
        if path.stat().st_size == 0:
            return True
        head = _head(path)
    except OSError:
        return False
    if head.startswith(_GEOJSON_OPEN):
        rest = head[len(_GEOJSON_OPEN):]
        return any(rest.startswith(n) for n in _GEOJSON_NEXT)
    if head.startswith(_CSV_OPEN.encode()) or (head.startswith(b"image,") and b",aji,aji_plus," in head):
        return True
    if head.startswith(_PNG_MAGIC):
        return _png_is_nucli(path)
    if head.startswith(b"PAR1"):
        return _parquet_is_nucli(path)
    return head.startswith(_REPORT_OPEN)


def _parquet_is_nucli(path: Path) -> bool:
    try:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
    except Exception:  # noqa: BLE001
        return False
    return names[:4] == _CSV_OPEN.split(",")


def describe(path: Path) -> str:
    """A few words on what is at ``path`` (for the refusal message)."""
    path = Path(path)
    try:
        if path.is_symlink() and not path.exists():
            return "a broken symbolic link"
        if path.is_dir():
            entries = list(path.iterdir())
            attrs = _zarr_attrs(path)
            if attrs is not None:
                return "a Zarr group that nucli did not write (no 'nucli' attribute)"
            return f"a folder of {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} that nucli did not write"
        size = path.stat().st_size
        head = _head(path, 16)
    except OSError as exc:
        return f"something nucli cannot read ({exc.strerror or exc})"
    kind = "file"
    if head.startswith(_PNG_MAGIC):
        kind = "PNG image"
    elif head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        kind = "TIFF image"
    elif head[:3] == b"\xff\xd8\xff":
        kind = "JPEG image"
    elif head.lstrip()[:1] in (b"{", b"["):
        kind = "JSON file"
    return f"a {kind} of {size:,} bytes that nucli did not write"


def check_replaceable(path: Path, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite`` and nucli wrote it (or it is empty)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    if not nucli_wrote(path):
        raise OutputExistsError(f"refusing to replace {path}: it is {describe(path)}; --overwrite replaces only "
                                "nucli's own outputs (move it away or choose another output)")


def png_info():
    """PIL ``PngInfo`` carrying nucli's marker (pass as ``pnginfo=`` to ``Image.save``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    return info
