"""The command-line options every benchmark shares."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def bench_parser(
    doc: str | None,
    quick: str,
    profile: str,
    quiet_before: str | None = None,
    runs: str | None = None,
    stores: bool = False,
) -> argparse.ArgumentParser:
    """--quick, --profile DIR, --py-spy, --keep; with quiet_before ("run", "restart") also
    --wait-quiet and --quiet-below for a shared machine; with runs ("mode", "cell") --runs
    (default 5, quick 3); with stores --store and --pg-url."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    p.add_argument("--quick", action="store_true", help=quick)
    if runs:
        p.add_argument("--runs", type=int, help=f"runs per {runs} (default 5, quick 3)")
    p.add_argument("--profile", type=Path, metavar="DIR", help=profile)
    p.add_argument("--py-spy", help="py-spy executable (default: the venv's, else PATH)")
    p.add_argument("--keep", action="store_true", help="keep the temporary broker home")
    if stores:
        p.add_argument(
            "--store",
            choices=["sqlite", "postgres", "both"],
            default="sqlite",
            help="the broker's store; both: a broker on each, runs alternated (sqlite)",
        )
        add_pg_url(p)
        add_workers(p, "alternated with the same client load")
    if quiet_before:
        p.add_argument(
            "--wait-quiet",
            type=float,
            metavar="S",
            help=f"shared machine: before each {quiet_before} wait up to S s until "
            "other processes use less than --quiet-below cores (default 30, quick 5)",
        )
        p.add_argument("--quiet-below", type=float, default=0.2, help="cores (0.2)")
    return p


def add_pg_url(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pg-url",
        default=os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL),
        help="PostgreSQL server where each run creates (and drops) a fresh database "
        f"(env BENCH_PG_URL, default {DEFAULT_PG_URL})",
    )


def add_workers(p: argparse.ArgumentParser, how: str) -> None:
    p.add_argument(
        "--workers",
        default="",
        metavar="N,M",
        help="worker-process counts: the broker as shipped, `broker serve --workers N` "
        f"(replicas sharing the ports), on a fresh PostgreSQL database each; {how}",
    )


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if hasattr(args, "workers"):
        args.workers = [int(x) for x in args.workers.split(",") if x]
        if args.workers and getattr(args, "store", "postgres") != "postgres":
            p.error("--workers runs replicas on PostgreSQL: pass --store postgres")
    if getattr(args, "wait_quiet", 0) is None:
        args.wait_quiet = 5.0 if args.quick else 30.0
    if hasattr(args, "runs"):
        args.runs = args.runs or (3 if args.quick else 5)
    return args
