"""moeworks' benchmarks: one module per benchmark, run from the repository root as
`python -m benchmarks.NAME` (figures of record and their commands: benchmarks/RESULTS.md). Shared
code lives in `common` (machine, timing, results) and `fixtures` (data and models several use)."""
