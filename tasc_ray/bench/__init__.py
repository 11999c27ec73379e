"""`tasc-ray bench ...`: the measurement harnesses. Each module in BENCH_MODULES registers one subcommand."""

from __future__ import annotations

import argparse
import importlib

BUSY_LOAD_PER_CPU = 0.75  # a start load average above this share of the cores means other work shared the CPU


def cpu_was_shared(load_average: float, cpus: int | None) -> bool:
    """Whether a benchmark started on a busy machine (its absolute numbers then measure contention too)."""
    return load_average > BUSY_LOAD_PER_CPU * (cpus or 1)


BENCH_MODULES: list[str] = ["tasc_ray.bench.spec", "tasc_ray.bench.ft", "tasc_ray.bench.serve", "tasc_ray.bench.index"]


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (results go under benchmarks/results/)",
                                  description="Benchmarks; each writes JSON, a markdown table and plots.")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for module in BENCH_MODULES:
        importlib.import_module(module).register(bench_sub)
