"""Benchmarks (not part of the installed package). A package so `benchmarks.benchmark.StepTimer` imports by name."""
