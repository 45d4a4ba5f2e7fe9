"""Benchmarks: ``python -m bench.<name>`` (enroll, sessions, relay, storm), each a short module on
the shared harness in bench/harness; not part of the broker package."""
