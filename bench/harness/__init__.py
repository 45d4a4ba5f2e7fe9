"""The benchmarks' shared harness; each benchmark (bench/<name>.py) is a short module on top of it.

- broker:    the broker child process (one class), its what-ifs and counters
- fleet:     client processes driven over pipes; SDK clients and simulated cameras inside them
- unary:     C unary calls in flight, one run's figures, printed alike by every unary benchmark
- provision: bench home and dev PKI, tokens, cameras, accounts, app instances, store checks
- stores:    the store under test (SQLite, PostgreSQL, or both with runs alternated) and ratios
- stats:     medians, percentiles, CPU of this process, its threads, any pid, the machine
- profiling: py-spy hook (when installed) and per-thread summaries

It uses the broker's public pieces only (Config, BrokerServer, the core authorities, the store
contract, the SDKs); it never reaches into a store's private state.
"""
