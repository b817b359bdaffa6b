"""Benchmarks (not tests): side-by-side ratios and raw timings written to bench/results/."""
