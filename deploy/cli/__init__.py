"""The `moeworks` command line: one module per command group, the entry point in `main`."""

from deploy.cli.main import app

__all__ = ["app"]
