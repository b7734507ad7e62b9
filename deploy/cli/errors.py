"""One rule for every command: bad input is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable


def exit_on(*error_types: type[Exception] | Callable[[], type[Exception]]):
    """Decorate a Typer command so that the given errors end it cleanly.

    Each entry is an exception class or a zero-argument callable returning one (so heavy modules
    are imported only when the command runs, keeping `--help` instant).
    """

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            import typer

            types = tuple(t if isinstance(t, type) else t() for t in error_types)
            try:
                return command(*args, **kwargs)
            except types as error:
                typer.echo(f"error: {error}", err=True)
                raise typer.Exit(2) from None

        return wrapper

    return decorate
