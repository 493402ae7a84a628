"""Stepwise benchmarks: the product's event path beside its limits and the design it replaces.

Run `python -m bench` (or `make bench`); `--short` runs every scenario in a few seconds.
"""
