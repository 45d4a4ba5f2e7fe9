"""Benchmarks (run as scripts or with ``python -m bench.<name>``); not part of the broker package."""
