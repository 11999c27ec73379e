"""`tasc-ray bench ...`: the measurement harnesses. Each module in BENCH_MODULES registers one subcommand."""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES: list[str] = ["tasc_ray.bench.spec", "tasc_ray.bench.ft", "tasc_ray.bench.serve", "tasc_ray.bench.index"]


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (results go under benchmarks/results/)",
                                  description="Benchmarks; each writes JSON, a markdown table and plots.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for module in BENCH_MODULES:
        importlib.import_module(module).register(bench_sub)
