"""Measurement harnesses, run from a source checkout: `python -m benchmarks NAME --help` (see README.md).

One module per benchmark (`spec`, `live`, `drafters`, `ft`, `serve` with `label` and `serve`, `index`), each
registering its subcommands; `common/` holds what they share; `results/` holds the current result of each benchmark.
"""

BENCH_MODULES: list[str] = [
    "benchmarks.spec",
    "benchmarks.live",
    "benchmarks.drafters",
    "benchmarks.ft",
    "benchmarks.serve",
    "benchmarks.index",
]
