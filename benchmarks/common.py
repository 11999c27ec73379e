"""Helpers shared by the benchmarks; BENCH_MODULES lists the harnesses, each registering its subcommands."""

from __future__ import annotations

BUSY_LOAD_PER_CPU = 0.75  # a start load average above this share of the cores means other work shared the CPU


def cpu_was_shared(load_average: float, cpus: int | None) -> bool:
    """Whether a benchmark started on a busy machine (its absolute numbers then measure contention too)."""
    return load_average > BUSY_LOAD_PER_CPU * (cpus or 1)


BENCH_MODULES: list[str] = ["benchmarks.spec", "benchmarks.ft", "benchmarks.serve", "benchmarks.index"]
