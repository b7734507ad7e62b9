"""The `moeworks` command line. Each vertical adds its own sub-command group here."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from deploy.edge.cli import app as edge_app
from finance.cli import app as finance_app
from manufacturing.cli import defects_app, maintenance_app
from twin.cli import app as twin_app

app = typer.Typer(help="moeworks: an industry AI suite on a shared Mixture-of-Experts engine.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(finance_app, name="finance")
app.add_typer(defects_app, name="defects")
app.add_typer(maintenance_app, name="maintenance")
app.add_typer(twin_app, name="twin")
app.add_typer(edge_app, name="edge")


def data_root() -> Path | None:
    """The real-data folder from MOEWORKS_DATA, or None on a fresh machine."""
    value = os.environ.get("MOEWORKS_DATA")
    return Path(value) if value else None


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="folder for everything the demo writes"),
         quick: bool = typer.Option(False, help="smaller data and fewer epochs (for tests)")) -> None:
    """Run the main job on embedded defaults: generated data, no set-up."""
    from deploy.demo import run_demo

    run_demo(out, quick=quick)


@app.command()
def version() -> None:
    """Print the installed moeworks version."""
    from importlib.metadata import version as installed

    typer.echo(installed("moeworks"))


if __name__ == "__main__":
    app()
