"""`moeworks demo`: the main job on embedded defaults (generated data, no set-up)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console


def run_demo(out_dir: Path, *, quick: bool = False) -> None:
    console = Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from deploy.core_demo import run_core_demo

    run_core_demo(out_dir, rows=5_000 if quick else 20_000, epochs=3 if quick else 8, console=console)
    from finance.demo import run_finance_demo

    run_finance_demo(out_dir, quick=quick, console=console)
    from manufacturing.maintenance.demo import run_maintenance_demo

    run_maintenance_demo(out_dir, quick=quick, console=console)
    console.rule()
    console.print(f"[bold green]demo finished in {time.perf_counter() - started:.0f} s; outputs in {out_dir}")
