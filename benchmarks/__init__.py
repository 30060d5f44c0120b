"""Benchmarks of xtf_kernels against its peers: ``python -m benchmarks.masked_ce --help``."""
