"""What every command shares: error handling, console output, summaries."""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from nucli.errors import NucliError

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("nucli")


_PLAIN = str.maketrans({"µ": "u", "μ": "u", "×": "x", "±": "+/-", "²": "2", "³": "3", "°": " deg", "—": "-",
                        "–": "-", "…": "...", "→": "->", "≤": "<=", "≥": ">=", "’": "'", "‘": "'", "“": '"', "”": '"'})
"""What nucli's own text falls back to on a stream that cannot encode it (``µm`` -> ``um``)."""


class _EncodableStream:
    """``sys.stdout``/``sys.stderr`` as found at each write (so a swapped stream is followed), with text the
    stream's encoding cannot hold spelt in ASCII (``µ`` -> ``u``; anything else -> ``?``): with
    ``PYTHONIOENCODING=ascii`` or an ASCII locale nucli still prints its tables and one-line errors."""

    def __init__(self, name: str):
        self._name = name

    @property
    def _stream(self):
        return getattr(sys, self._name)

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        stream = self._stream
        enc = getattr(stream, "encoding", None) or "utf-8"
        try:
            text.encode(enc)
        except UnicodeEncodeError:
            text = text.translate(_PLAIN).encode(enc, errors="replace").decode(enc)
        except LookupError:  # an encoding Python does not know: write as is
            pass
        return stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, attr: str):  # isatty, fileno, ... of the stream
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self._stream, attr)


def stdout() -> Console:
    return Console(file=_EncodableStream("stdout"))  # type: ignore[arg-type]


def stderr() -> Console:
    return Console(file=_EncodableStream("stderr"), stderr=True)  # type: ignore[arg-type]


def _debug_enabled() -> bool:
    from typer.main import get_current_context  # typer bundles its own click

    ctx = get_current_context(silent=True)
    if ctx is None:
        return False
    root = ctx.find_root()
    return bool((root.obj or {}).get("debug"))


def handle_errors(func: F) -> F:
    """Turn project errors into one-line messages and exit codes.

    ``NucliError`` -> its message and ``exit_code``; ``KeyboardInterrupt`` -> 130
    with a note that the run can be resumed (the interrupt's own message, when a
    command raises one with a better hint); an ``OSError`` (disk full, permission
    denied) -> exit 2 naming the file; anything else -> exit 3 with a hint to rerun
    with ``--debug`` for the traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except NucliError as exc:
            if _debug_enabled():
                raise
            stderr().print(f"[bold red]Error:[/] {_one_line(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            if _debug_enabled():
                raise
            hint = " ".join(str(exc).split()) or "Finished work is saved; rerun the same command to resume."
            stderr().print(f"[yellow]Interrupted.[/] {hint}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except OSError as exc:
            if _debug_enabled():
                raise
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            msg = exc.strerror or str(exc)
            stderr().print(f"[bold red]Error:[/] {msg}{where}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as exc:  # noqa: BLE001 - last line of defence, never a traceback
            if _debug_enabled():
                raise
            stderr().print(
                f"[bold red]Internal error:[/] {type(exc).__name__}: {_one_line(exc)} "
                "(rerun with `nucli --debug ...` for the traceback)",
                highlight=False, soft_wrap=True,
            )
            raise typer.Exit(3) from None

    return wrapper  # type: ignore[return-value]


def interrupt_hint(hint: str) -> Callable[[F], F]:
    """Decorator (under :func:`handle_errors`): Ctrl-C prints ``hint`` instead of the note about resuming."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except KeyboardInterrupt:
                raise KeyboardInterrupt(hint) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def print_summary(summary: dict[str, Any], *, as_json: bool, quiet: bool, title: str) -> None:
    """Print the end-of-run summary: a JSON object on stdout, or a small table."""
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str, sort_keys=True) + "\n")
        return
    if quiet:
        return
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # long paths wrap instead of being cut
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(f"[bold]{key}[/]", str(value))
    stdout().print(table)
