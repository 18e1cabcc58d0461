"""Benchmarks of dualenc against seed 003's approach; run with `python -m bench`. Never imported by the library."""
