"""The Typer app: wires subcommands together, nothing else."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from typer.core import TyperGroup

from nucli.commands import demo, enhance, evaluate, info, models, segment, stitch, tile, train


# click's UsageError as typer uses it (typer may vendor its own copy of click)
_USAGE_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError") or (typer.BadParameter,)


class _Group(TyperGroup):
    """Click reports usage errors (bad option, missing argument, unknown command) with exit
    code 2; nucli documents 1 for usage errors and keeps 2 for input errors."""

    def make_context(self, *args, **kwargs):  # noqa: ANN002, ANN003 - click's signature
        try:
            return super().make_context(*args, **kwargs)
        except _USAGE_ERRORS as exc:
            exc.exit_code = 1
            raise

    def invoke(self, ctx):  # noqa: ANN001 - click's Context
        try:
            return super().invoke(ctx)
        except _USAGE_ERRORS as exc:
            exc.exit_code = 1
            raise


app = typer.Typer(
    name="nucli",
    cls=_Group,
    help="Find every cell nucleus in whole-slide microscopy images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        from nucli import __version__

        typer.echo(f"nucli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show info logs.")] = False,
) -> None:
    """Find every cell nucleus in whole-slide microscopy images."""
    ctx.obj = {"debug": debug}
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logger = logging.getLogger("nucli")
    if not logger.handlers:
        from rich.logging import RichHandler

        from nucli.commands._common import stderr

        handler = RichHandler(show_path=False, console=stderr())
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


app.command("tile")(tile.run)
app.command("enhance")(enhance.run)
app.command("segment")(segment.run)
app.command("stitch")(stitch.run)
app.command("evaluate")(evaluate.run)
app.command("train")(train.run)
app.command("info")(info.run)
app.command("models")(models.run)
app.command("demo")(demo.run)


if __name__ == "__main__":  # pragma: no cover
    app()
