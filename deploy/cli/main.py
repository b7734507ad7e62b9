"""The `moeworks` command line. Each vertical's command group is imported only when it is used.

Three things happen here for every command, in one place:
- sub-command groups load lazily (`moeworks --help` imports no torch, pandas or scikit-learn);
- deprecated flag names are rewritten to the current grammar with one line on stderr (`DEPRECATED_FLAGS`);
- a user's mistake (`deploy.cli.errors`) becomes `error: <one line>` on stderr and exit code 2.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer (>= 0.29) vendors click

from deploy.cli import output
from deploy.cli.errors import UserInputError, one_line, user_error_types
from deploy.cli.lazy import LazyGroup

# name -> ("module:attribute", one-line help). The attribute is a Typer app (a group) or a command
# function; the help is what `moeworks --help` lists, so listing imports nothing.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "finance": ("deploy.cli.finance:app", "Credit scoring: train, evaluate, score batches."),
    "defects": ("deploy.cli.manufacturing:defects_app", "Surface defect detection (YOLO + MoE), sizes in mm."),
    "maintenance": ("deploy.cli.manufacturing:maintenance_app",
                    "Predictive maintenance: RUL on C-MAPSS, failures on AI4I."),
    "twin": ("deploy.cli.twin:app", "Digital twin of factory assets fed over MQTT."),
    "edge": ("deploy.cli.edge:app", "Edge devices: publish machine telemetry over MQTT (Sparkplug B)."),
    "bundle": ("deploy.cli.bundle:app", "Partner bundles: one ONNX graph from raw fields to decisions, a model "
                                        "card, test vectors and a signed manifest."),
    "data": ("deploy.cli.data:app", "Data quality: rules, domains and label checks before data becomes "
                                    "training data."),
    "compress": ("deploy.cli.compress:app", "Compress a trained model: distil it into a small student, prune "
                                            "channels or experts, or hash its weights."),
    "serve": ("deploy.cli.serve:serve", "Serve a model over HTTP: POST /v1/predict, /healthz, /readyz, /v1/model, "
                                        "/metrics."),
}

# (group, command) -> {old flag: new flag}: the names of the previous release, kept for one more.
DEPRECATED_FLAGS: dict[tuple[str, ...], dict[str, str]] = {
    ("finance", "score"): {"--input": "--data", "--output": "--out"},
    ("finance", "train"): {"--model": "--kind"},
    ("maintenance", "train"): {"--model": "--kind"},
    ("maintenance", "evaluate"): {"--test": "--data"},
    ("maintenance", "export"): {"--test": "--data"},
    ("defects", "train"): {"--moe": "--train-moe", "--no-moe": "--no-train-moe"},
    ("defects", "evaluate"): {"--moe": "--moe-stage"},
    ("defects", "predict"): {"--source": "--data", "--moe": "--moe-stage"},
    ("defects", "export"): {"--moe": "--moe-stage"},
    ("edge", "run"): {"--source": "--kind", "--host": "--broker-host", "--port": "--broker-port"},
}

# `serve MODEL` (a positional model right after `serve`) is rewritten to `serve --model MODEL` too.

# Accepted anywhere on the line (`moeworks finance score ... --quiet`) and applied to the whole run.
GLOBAL_FLAGS = ("--quiet", "--verbose")


def command_words(args: Sequence[str]) -> tuple[str, ...]:
    """The leading words of a command line: ("finance", "train") of `finance train --kind moe`."""
    return tuple(itertools.takewhile(lambda a: not a.startswith("-"), (a for a in args if a not in GLOBAL_FLAGS)))


def modernize(args: Sequence[str]) -> list[str]:
    """`args` in the current grammar: deprecated flags renamed (one stderr line each), global flags first."""
    args = list(args)
    words = command_words(args)
    command = next((words[:n] for n in (3, 2) if words[:n] in DEPRECATED_FLAGS), ())
    renames = DEPRECATED_FLAGS.get(command, {})
    front, rest = [], []
    if words[:1] == ("serve",) and len(words) > 1:  # `serve MODEL`: the model was positional
        typer.echo("deprecated: `moeworks serve MODEL` is now `moeworks serve --model MODEL`; the old form is "
                   "accepted until the next release", err=True)
        position = args.index(words[1])
        args = [*args[:position], "--model", *args[position:]]
    for index, arg in enumerate(args):
        if arg == "--":  # everything after it is a value
            rest.extend(args[index:])
            break
        if arg in GLOBAL_FLAGS:
            front.append(arg)
            continue
        flag, equals, value = arg.partition("=")
        if flag in renames:
            new = renames[flag]
            typer.echo(f"deprecated: `moeworks {' '.join(command)} {flag}` is now {new}; the old name is "
                       "accepted until the next release", err=True)
            arg = new + equals + value
        rest.append(arg)
    return front + rest


class MoeworksGroup(LazyGroup):
    """The root group: lazy sub-commands, deprecated flags, and the one place user errors end a run."""

    lazy = LAZY_COMMANDS

    def list_commands(self, ctx) -> list[str]:
        """The verticals' groups first (as `moeworks --help` always listed them), then auth, demo, version."""
        return [*self.lazy, *(name for name in self.commands if name not in self.lazy)]

    _words: tuple[str, ...] = ()  # the command's words (`finance train`), for its warnings log

    def main(self, args: Sequence[str] | None = None, *pos: Any, **kwargs: Any) -> Any:
        args = modernize(sys.argv[1:] if args is None else args)
        self._words = command_words(args)
        return super().main(args, *pos, **kwargs)

    def make_context(self, *args: Any, **kwargs: Any):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        # the global flags, parsed by now, apply before anything of the command runs (its warnings too)
        output.configure(quiet=ctx.params.get("quiet", False), verbose=ctx.params.get("verbose", False))
        name = "-".join(self._words[:2]) or "moeworks"
        try:
            with _one_line_usage_errors(), output.warnings_to(Path("runs/logs") / f"{name}.log",
                                                              command=" ".join(self._words)):
                return super().invoke(ctx)
        except Exception as error:
            if not isinstance(error, user_error_types()):
                raise
            typer.echo(f"error: {one_line(error)}", err=True)
            raise typer.Exit(2) from None


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """Click's usage errors (a missing option, a value of the wrong type, an unknown command) are the
    user's mistakes too: one line and exit code 2 instead of a usage box (help on no arguments stays)."""
    try:
        yield
    except NoArgsIsHelpError:
        raise
    except UsageError as error:
        where = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
        typer.echo(f"error: {one_line(error.format_message())}{where}", err=True)
        raise typer.Exit(2) from None


app = typer.Typer(cls=MoeworksGroup, help="moeworks: an industry AI suite on a shared Mixture-of-Experts engine.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def main_options(quiet: bool = typer.Option(False, "--quiet", help="only the result and errors: no notes, "
                                                                   "tables or progress (also after the command)"),
                 verbose: bool = typer.Option(False, "--verbose", help="let third-party libraries print to the "
                                                                       "terminal instead of the run's log file "
                                                                       "(also after the command)")) -> None:
    """moeworks: an industry AI suite on a shared Mixture-of-Experts engine."""
    # the values take effect in MoeworksGroup.invoke, before this callback and the command run


auth_app = typer.Typer(help="Bearer tokens with roles for `twin serve` and `serve` (--auth-file).",
                       no_args_is_help=True)
app.add_typer(auth_app, name="auth")


@auth_app.command("token")
def auth_token(role: str = typer.Option(..., help="viewer (reads), operator (acknowledges, what-ifs, scores) "
                                                  "or admin (MES, ETL, configuration)"),
               file: Path = typer.Option(..., help="token file (made if missing); only hashes are stored"),
               name: str = typer.Option("operator", help="who holds the token; recorded with what it does"),
               as_json: bool = typer.Option(False, "--json", help="print the token with its role, name and file as "
                                                                  "one JSON object on stdout")) -> None:
    """Make a token, print it once on stdout, and store only its SHA-256 hash in FILE."""
    from twin.auth import create_token

    token = create_token(file, role=role, name=name)
    if as_json:
        output.emit("auth.token", {"token": token, "role": role, "name": name, "file": str(file)})
    else:
        typer.echo(token)
    output.note(f"stored the hash of a {role} token for {name!r} in {file}; the token is not kept anywhere")


@auth_app.command("revoke")
def auth_revoke(token_id: str = typer.Argument(..., help="the 16 hex digits after `mw_`"),
                file: Path = typer.Option(..., help="token file")) -> None:
    """Remove a token from FILE; services read the file at start-up, so restart them."""
    from twin.auth import revoke_token

    if not revoke_token(file, token_id):
        raise UserInputError(f"no token {token_id} in {file}")
    output.note(f"revoked {token_id}")


def data_root() -> Path | None:
    """The real-data folder from MOEWORKS_DATA, or None on a fresh machine."""
    value = os.environ.get("MOEWORKS_DATA")
    return Path(value) if value else None


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="folder for everything the demo writes (and demo.log, "
                                                          "where third-party output goes unless --verbose)"),
         quick: bool = typer.Option(False, help="smaller data and fewer epochs (for tests)")) -> None:
    """Run the main job on embedded defaults: generated data, no set-up."""
    from deploy.demo import run_demo

    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} is a file; give a folder")
    run_demo(out, quick=quick)


@app.command()
def version() -> None:
    """Print the installed moeworks version."""
    from importlib.metadata import version as installed

    typer.echo(installed("moeworks"))


if __name__ == "__main__":
    app()
