"""`moeworks demo`: the main job on embedded defaults (generated data, no set-up)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console


def run_demo(out_dir: Path, *, quick: bool = False) -> None:
    """The demo's tables on the console; what libraries print (ultralytics' ~150 lines a run, warnings)
    in OUT/demo.log, unless `moeworks --verbose demo`."""
    from deploy.cli.output import SETTINGS, third_party_output_to

    out_dir.mkdir(parents=True, exist_ok=True)
    with third_party_output_to(out_dir / "demo.log") as (stdout, _):
        console = Console(file=stdout, quiet=SETTINGS.quiet)
        if not SETTINGS.verbose:
            console.print(f"[dim]third-party output (ultralytics, warnings) goes to {out_dir / 'demo.log'}; "
                          "`moeworks --verbose demo` shows it here")
        _run_parts(out_dir, quick=quick, console=console)


def _run_parts(out_dir: Path, *, quick: bool, console: Console) -> None:
    started = time.perf_counter()
    from deploy.core_demo import run_core_demo

    run_core_demo(out_dir, rows=5_000 if quick else 20_000, epochs=3 if quick else 8, console=console)
    from deploy.serving.demo import run_serving_demo

    run_serving_demo(out_dir / "core_demo_moe.pt", rows=5_000 if quick else 20_000, console=console)
    from finance.demo import run_finance_demo

    run_finance_demo(out_dir, quick=quick, console=console)
    from manufacturing.defects.demo import run_defects_demo

    run_defects_demo(out_dir, quick=quick, console=console)
    from manufacturing.maintenance.demo import run_maintenance_demo

    run_maintenance_demo(out_dir, quick=quick, console=console)
    from deploy.twin_demo import run_twin_demo

    console.rule("digital twin (generated machines over an in-process MQTT broker)")
    models = out_dir / "maintenance"  # the health models the maintenance demo just trained
    # force: a rerun replaces what the twin demo made in its own subfolder last time (only that: deploy.twin_demo)
    run_twin_demo(out_dir / "twin", duration_s=6 if quick else 20, rate_hz=20, console=console,
                  rul_model=models / "rul_model", ai4i_model=models / "ai4i_model", force=True)
    console.rule()
    console.print(f"[bold green]demo finished in {time.perf_counter() - started:.0f} s; outputs in {out_dir}")
