"""The `moeworks` command line. Each vertical adds its own sub-command group here."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from deploy.cli.bundle import app as bundle_app
from deploy.cli.compress import app as compress_app
from deploy.cli.data import app as data_app
from deploy.cli.edge import app as edge_app
from deploy.cli.finance import app as finance_app
from deploy.cli.manufacturing import defects_app, maintenance_app
from deploy.cli.serve import serve as serve_command
from deploy.cli.twin import app as twin_app

app = typer.Typer(help="moeworks: an industry AI suite on a shared Mixture-of-Experts engine.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(finance_app, name="finance")
app.add_typer(defects_app, name="defects")
app.add_typer(maintenance_app, name="maintenance")
app.add_typer(twin_app, name="twin")
app.add_typer(edge_app, name="edge")
app.add_typer(bundle_app, name="bundle")
app.add_typer(data_app, name="data")
app.add_typer(compress_app, name="compress")
app.command("serve")(serve_command)

auth_app = typer.Typer(help="Bearer tokens with roles for `twin serve` and `serve` (--auth-file).",
                       no_args_is_help=True)
app.add_typer(auth_app, name="auth")


@auth_app.command("token")
def auth_token(role: str = typer.Option(..., help="viewer (reads), operator (acknowledges, what-ifs, scores) "
                                                  "or admin (MES, ETL, configuration)"),
               file: Path = typer.Option(..., help="token file (made if missing); only hashes are stored"),
               name: str = typer.Option("operator", help="who holds the token; recorded with what it does")) -> None:
    """Make a token, print it once on stdout, and store only its SHA-256 hash in FILE."""
    from twin.auth import AuthError, create_token

    try:
        token = create_token(file, role=role, name=name)
    except AuthError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(token)
    typer.echo(f"stored the hash of a {role} token for {name!r} in {file}; the token is not kept anywhere", err=True)


@auth_app.command("revoke")
def auth_revoke(token_id: str = typer.Argument(..., help="the 16 hex digits after `mw_`"),
                file: Path = typer.Option(..., help="token file")) -> None:
    """Remove a token from FILE; services read the file at start-up, so restart them."""
    from twin.auth import AuthError, revoke_token

    try:
        removed = revoke_token(file, token_id)
    except AuthError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if not removed:
        typer.echo(f"error: no token {token_id} in {file}", err=True)
        raise typer.Exit(2)
    typer.echo(f"revoked {token_id}", err=True)


def data_root() -> Path | None:
    """The real-data folder from MOEWORKS_DATA, or None on a fresh machine."""
    value = os.environ.get("MOEWORKS_DATA")
    return Path(value) if value else None


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="folder for everything the demo writes"),
         quick: bool = typer.Option(False, help="smaller data and fewer epochs (for tests)")) -> None:
    """Run the main job on embedded defaults: generated data, no set-up."""
    from deploy.demo import run_demo

    if out.exists() and not out.is_dir():
        typer.echo(f"error: --out {out} is a file; give a folder", err=True)
        raise typer.Exit(2)
    run_demo(out, quick=quick)


@app.command()
def version() -> None:
    """Print the installed moeworks version."""
    from importlib.metadata import version as installed

    typer.echo(installed("moeworks"))


if __name__ == "__main__":
    app()
