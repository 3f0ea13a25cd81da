"""Benchmarks and load tests (dev tools; never run in CI)."""
