"""`moeworks twin ...`: the digital twin service."""

import typer

app = typer.Typer(help="Digital twin of factory assets fed over MQTT.", no_args_is_help=True)
