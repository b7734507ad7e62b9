"""`moeworks finance ...`: credit scoring commands."""

import typer

app = typer.Typer(help="Credit scoring: train, evaluate, score batches.", no_args_is_help=True)
