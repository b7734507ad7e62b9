"""`moeworks twin rollout start|status|abort`: model rollouts through the twin's REST API.

The token comes from --token-file or MOEWORKS_TOKEN (never a command-line argument, which `ps` shows);
starting and aborting need an admin token, status a viewer one. The bundle folder is read by the twin,
so --bundle is a path on the twin's host (made absolute here).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from deploy.cli import output
from deploy.cli.errors import UserInputError

app = typer.Typer(help="Signed model rollouts to edge nodes, canary first (twin serve --rollout-key).",
                  no_args_is_help=True)

Url = typer.Option("http://127.0.0.1:8000", "--url", help="the twin's API")
TokenFile = typer.Option(None, "--token-file", help="file holding a bearer token (or set MOEWORKS_TOKEN)")
Ca = typer.Option(None, "--ca", help="CA certificate (PEM) that signed the twin's HTTPS certificate")
JsonOut = typer.Option(False, "--json", help="print one JSON object on stdout")


def _fail(message: str) -> None:
    raise UserInputError(message)


def _call(method: str, url: str, path: str, token_file: Path | None, ca: Path | None, body: dict | None = None):
    import httpx

    token = os.environ.get("MOEWORKS_TOKEN")
    if token_file is not None:
        if not token_file.is_file() or token_file.stat().st_size > 4096:
            _fail(f"--token-file {token_file}: no such file (or larger than 4 KiB)")
        token = token_file.read_text().strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, url.rstrip("/") + path, json=body, headers=headers, timeout=60.0,
                                 verify=str(ca) if ca else True)
    except httpx.HTTPError as error:
        _fail(f"cannot reach the twin at {url}: {error}")
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:300]
        _fail(f"the twin answered {response.status_code}: {detail}")
    return response.json()


def _show(command: str, status: dict, as_json: bool) -> None:
    if as_json:
        output.emit(f"twin.rollout.{command}", status)
        return
    output.note(f"rollout {status['id']}: {status['state']} (model {status['version']}, canary "
                f"{status['canary_share']:g}){': ' + status['reason'] if status.get('reason') else ''}")
    output.note("  " + ", ".join(f"{k} {v}" for k, v in sorted(status["counts"].items())))


@app.command()
def start(bundle: Path = typer.Option(..., help="the signed bundle folder (`moeworks bundle build --sign-key`)"),
          nodes: str = typer.Option(..., help="comma-separated edge node ids"),
          canary: float = typer.Option(0.1, help="share of the nodes that take the model first (0-1]"),
          gate_rows: int = typer.Option(50, help="rows each node scores under watch after its swap"),
          max_drift: float = typer.Option(0.2, help="roll back above this mean |p_new - p_previous|"),
          max_error_rate: float = typer.Option(0.0, help="roll back above this share of failed scorings"),
          max_latency_ms: float = typer.Option(250.0, help="roll back above this p95 scoring time (CPU ms a row)"),
          url: str = Url, token_file: Path | None = TokenFile, ca: Path | None = Ca, as_json: bool = JsonOut) -> None:
    """Offer BUNDLE to NODES: the canary share first, the rest once every canary passed its health gate."""
    targets = [n.strip() for n in nodes.split(",") if n.strip()]
    if not targets:
        _fail("--nodes names no node")
    if not 0 < canary <= 1:
        _fail("--canary must be in (0, 1]")
    body = {"bundle": str(bundle.resolve()), "nodes": targets, "canary": canary,
            "gate": {"rows": gate_rows, "max_drift": max_drift, "max_error_rate": max_error_rate,
                     "max_latency_ms": max_latency_ms}}
    _show("start", _call("POST", url, "/api/rollouts", token_file, ca, body), as_json)


@app.command()
def status(rollout_id: str | None = typer.Argument(None, help="a rollout id (default: every rollout)"),
           url: str = Url, token_file: Path | None = TokenFile, ca: Path | None = Ca, as_json: bool = JsonOut) -> None:
    """A rollout's state and each node's, or every rollout's."""
    if rollout_id is not None:
        _show("status", _call("GET", url, f"/api/rollouts/{rollout_id}", token_file, ca), as_json)
        return
    rollouts = _call("GET", url, "/api/rollouts", token_file, ca)
    if as_json:
        output.emit("twin.rollout.status", {"rollouts": rollouts})
        return
    for item in rollouts:
        _show("status", item, False)


@app.command()
def abort(rollout_id: str = typer.Argument(..., help="the rollout id"),
          url: str = Url, token_file: Path | None = TokenFile, ca: Path | None = Ca, as_json: bool = JsonOut) -> None:
    """Stop a running rollout: nodes not yet told are skipped, downloads in progress are cancelled."""
    _show("abort", _call("POST", url, f"/api/rollouts/{rollout_id}/abort", token_file, ca), as_json)
