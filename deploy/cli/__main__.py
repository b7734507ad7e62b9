"""`python -m deploy.cli`: the same as the `moeworks` command."""

from deploy.cli.main import app

app()
