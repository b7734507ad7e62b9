"""Run statements in a `python -O` interpreter (asserts stripped) and name what each one raised."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_RUNNER = """
import json, sys
exec(sys.argv[1])
results = {}
for name, statement in json.loads(sys.argv[2]).items():
    try:
        exec(statement)
        results[name] = "accepted"
    except ValueError:  # subclasses too (MaintenanceDataError, NotFittedError)
        results[name] = "ValueError"
    except Exception as error:
        results[name] = type(error).__name__
print(json.dumps({"optimize": sys.flags.optimize, "results": results}))
"""


def raised_under_optimize(imports: str, cases: dict[str, str]) -> dict[str, str]:
    """name -> "ValueError" (or a subclass), another exception's name, or "accepted".

    `imports` runs first, in one interpreter for all cases (torch imports once). Fails the test
    if the interpreter did not run with asserts stripped.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-O", "-c", _RUNNER, imports, json.dumps(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["optimize"] == 1, "the interpreter kept its asserts"
    return report["results"]
