"""`nucli stitch` (not built yet)."""

from __future__ import annotations

from nucli.commands._common import handle_errors
from nucli.errors import NotAvailableError


@handle_errors
def run() -> None:
    """Not built yet in this version."""
    raise NotAvailableError("`nucli stitch` is not built yet in this version of nucli")
