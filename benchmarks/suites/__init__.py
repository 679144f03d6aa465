"""Benchmark suites of `benchmarks/run.py`: each module has `run(ctx) -> dict`."""
