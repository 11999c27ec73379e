"""Measurement harnesses (run from a source checkout: `python -m benchmarks NAME --help`); results in results/."""
