"""`python -m benchmarks NAME ...`: run one benchmark from a source checkout (results go under benchmarks/results/)."""

import sys

from benchmarks import BENCH_MODULES
from tasc_ray.cli.main import build_parser, run

if __name__ == "__main__":
    parser = build_parser(
        "python -m benchmarks",
        BENCH_MODULES,
        "tasc_ray benchmarks: each writes JSON and markdown (starting with the command that produced them) under "
        "benchmarks/results/ by default. See benchmarks/README.md.",
    )
    sys.exit(run(parser))
