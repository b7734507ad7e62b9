"""`moeworks defects ...` and `moeworks maintenance ...`: the manufacturing commands."""

import typer

defects_app = typer.Typer(help="Surface defect detection (YOLO + MoE), sizes in mm.", no_args_is_help=True)
maintenance_app = typer.Typer(help="Predictive maintenance: RUL on C-MAPSS, failures on AI4I.",
                              no_args_is_help=True)

# Predictive maintenance commands (manufacturing/maintenance/cli.py).
from manufacturing.maintenance.cli import register as _register_maintenance  # noqa: E402

_register_maintenance(maintenance_app)
