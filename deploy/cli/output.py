"""Where a command's output goes, the same for every command.

- `--json`: exactly one JSON object on stdout (`emit`), with a `schema` key "moeworks.<command>/<version>"
  and the same key names across commands: `model` is always a path, `kind` a model family, `data` the
  input, `out` what was written, `rows` a count of records.
- Tables, notes and progress go to stderr when --json is given (`console`, `say`), and progress bars only
  to a terminal (`show_progress`). `--quiet` leaves only the result and errors.
- Third-party output goes into a log file unless `--verbose`: Python warnings of every command into
  runs/logs/<group>-<command>.log (`warnings_to`, made only when a warning comes), and everything
  ultralytics prints into the run's own log (`third_party_output_to`).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import typer

SCHEMA_VERSION = 1


@dataclass
class OutputSettings:
    """The run's global output flags (`moeworks --quiet/--verbose`, accepted anywhere on the line)."""

    quiet: bool = False
    verbose: bool = False


SETTINGS = OutputSettings()


def configure(*, quiet: bool, verbose: bool) -> None:
    SETTINGS.quiet, SETTINGS.verbose = quiet, verbose


def schema(command: str) -> str:
    """The versioned name of a command's JSON object: "moeworks.finance.score/1"."""
    return f"moeworks.{command}/{SCHEMA_VERSION}"


def _plain(value: Any) -> Any:
    """JSON for what json cannot write itself: paths as strings, numpy scalars and arrays as numbers and lists."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def emit(command: str, result: dict) -> None:
    """Print `result` as the run's one JSON object on stdout, under its schema key."""
    typer.echo(json.dumps({"schema": schema(command), **result}, default=_plain))


def say(text: str, *, as_json: bool = False) -> None:
    """A human-readable result line: stdout, or stderr when stdout carries the JSON; none with --quiet."""
    if not SETTINGS.quiet:
        typer.echo(text, err=as_json)


def note(text: str) -> None:
    """A note about the run (what was generated, where a report went): stderr; none with --quiet."""
    if not SETTINGS.quiet:
        typer.echo(text, err=True)


def warn(text: str) -> None:
    """A warning the user must see even with --quiet (e.g. metrics measured on training rows): stderr."""
    typer.echo(text, err=True)


def console(*, as_json: bool = False):
    """A rich console for tables: stdout, or stderr when stdout carries the JSON; silent with --quiet."""
    from rich.console import Console

    return Console(stderr=as_json, quiet=SETTINGS.quiet)


def show_progress(as_json: bool = False) -> bool:
    """Draw progress bars only for a person at a terminal: not with --json or --quiet, not into a pipe or log."""
    return not (as_json or SETTINGS.quiet) and sys.stderr.isatty()


@contextmanager
def third_party_output_to(log: Path) -> Iterator[tuple[TextIO, TextIO]]:
    """Send what libraries print (sys.stdout/sys.stderr, their logging handlers, warnings) into `log`.

    Yields the real (stdout, stderr) for the command's own console. With --verbose nothing is redirected.
    """
    real = (sys.stdout, sys.stderr)
    if SETTINGS.verbose:
        yield real
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8", buffering=1) as sink:
        # handlers made before this block (a library imported earlier) hold the real streams themselves
        handlers = _stream_handlers((*real, sys.__stdout__, sys.__stderr__))
        streams = [handler.setStream(sink) for handler in handlers]
        sys.stdout = sys.stderr = sink
        try:
            with warnings.catch_warnings():  # into this log rather than the command's (warnings_to)
                warnings.showwarning = functools.partial(_write_warning, sink)
                yield real
        finally:
            sys.stdout, sys.stderr = real
            for handler, stream in zip(handlers, streams, strict=True):
                handler.setStream(stream)
            for handler in _stream_handlers((sink,)):  # made inside the block (a library imported there)
                handler.setStream(real[0])


def _stream_handlers(streams: tuple) -> list[logging.StreamHandler]:
    """Every logging handler that writes to one of `streams`."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [handler for logger in loggers if isinstance(logger, logging.Logger) for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler) and handler.stream in streams]


def _write_warning(sink, message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning, writing to `sink` instead of stderr."""
    sink.write(warnings.formatwarning(message, category, filename, lineno, line))


class _LogOnDemand:
    """A log file opened at its first write (so a run without warnings leaves no file)."""

    def __init__(self, path: Path, header: str) -> None:
        self.path, self.header, self.file, self.count = path, header, None, 0

    def write(self, text: str) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            self.file.write(self.header)
        self.file.write(text)
        self.count += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@contextmanager
def warnings_to(log: Path, *, command: str) -> Iterator[None]:
    """Python warnings raised while the block runs go into `log` (one note on stderr says how many), not
    between the command's output; with --verbose they print as usual."""
    if SETTINGS.verbose:
        yield
        return
    sink = _LogOnDemand(log, f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} moeworks {command}\n")

    with warnings.catch_warnings():
        warnings.showwarning = functools.partial(_write_warning, sink)
        try:
            yield
        finally:
            sink.close()
            if sink.count:
                note(f"{sink.count} warning(s) from libraries written to {log} (--verbose shows them here)")
