"""`nucli models`: the registered methods, their weights, pixel size and test-split metrics."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from nucli.commands import _options as opt
from nucli.commands._common import handle_errors

NameArg = Annotated[
    Optional[str], typer.Argument(help="Show one method in full, with its model card.", show_default=False)
]
_SHOWN = ("aji", "aji_plus", "pq", "dice", "f1")


@handle_errors
def run(
    name: NameArg = None,
    quiet: opt.Quiet = False,
    json_summary: opt.JsonSummary = False,
) -> None:
    """List the methods: weights and their SHA-256 status, pixel size, test-split accuracy.

    Metrics come from each method's model card (the JSON beside its weights, else the card's markdown). With NAME: everything about one method, and its model card.

    Examples:

      nucli models

      nucli models gensegnet

      nucli models --json
    """
    from nucli.api import method_catalog
    from nucli.models.registry import get_spec

    entries = method_catalog()
    if name is not None:
        spec = get_spec(name)  # unknown name -> usage error listing the known ones
        entries = [e for e in entries if e["name"] == spec.name]
    if json_summary:
        import json
        import sys

        sys.stdout.write(json.dumps(entries if name is None else entries[0], default=str, sort_keys=True) + "\n")
        return
    if quiet:
        return
    if name is None:
        _print_table(entries)
    else:
        _print_one(entries[0])


def _metrics_text(m: dict[str, Any] | None) -> str:
    if not m:
        return "-"
    return " ".join(f"{k.upper().replace('_PLUS', '+')} {m[k]:.3f}" for k in _SHOWN if k in m)


def _short_status(status: str) -> str:
    for key, short in (("ok", "ok"), ("MISMATCH", "[red]SHA-256 mismatch[/]"), ("no pinned", "present, unpinned"),
                       ("missing", "[yellow]missing[/]"), ("not needed", "none needed")):
        if key in status:
            return short
    return status


def _print_table(entries: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from nucli.commands._common import stdout

    t = Table(title="nucli methods")
    t.add_column("method", no_wrap=True)
    t.add_column("weights", overflow="fold")
    t.add_column("µm/px", justify="right")
    t.add_column("nucleus px", justify="right")
    t.add_column("test split, mean over images", overflow="fold")
    t.add_column("weights licence", overflow="fold")
    for e in entries:
        name = f"{e['name']} *" if e["default"] else e["name"]
        subset = f" [dim](on {e['test_subset']})[/]" if e.get("test_subset") else ""
        t.add_row(name, _short_status(e["weights_status"]), f"{e['mpp']:g}", f"{e['nucleus_diameter_px']:g}",
                  _metrics_text(e["test_metrics"]) + subset, e.get("licence") or "-")
    con = stdout()
    con.print(t)
    con.print("* default method. Weights files, SHA-256 and the model card: [bold]nucli models NAME[/]",
              highlight=False)


def _print_one(e: dict[str, Any]) -> None:
    from pathlib import Path

    from rich.markdown import Markdown
    from rich.table import Table

    from nucli.commands._common import stdout

    t = Table(title=f"method {e['name']}", show_header=False, box=None)
    t.add_column(no_wrap=True)
    t.add_column(overflow="fold")
    for key in ("summary", "default", "mpp", "nucleus_diameter_px", "max_nucleus_diameter_px", "tile_size",
                "overlap", "weights_path", "size_mb", "weights_status", "sha256", "sha256_expected", "licence",
                "card"):
        t.add_row(f"[bold]{key}[/]", "-" if e.get(key) is None else str(e[key]))
    t.add_row("[bold]test metrics[/]", _metrics_text(e["test_metrics"])
              + (f"  (from {e['test_metrics_source']})" if e["test_metrics_source"] else ""))
    con = stdout()
    con.print(t)
    if e.get("card"):
        con.print(Markdown(Path(e["card"]).read_text()))
