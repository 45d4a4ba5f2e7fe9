"""A local broker cluster: N replicas sharing the public ports (SO_REUSEPORT) on one PostgreSQL.

    python tools/cluster.py start [--replicas 3] [--store postgresql://...] [--drain-window 10]
    python tools/cluster.py rolling-restart [--pause 2]
    python tools/cluster.py stop

``start`` runs in the foreground (``make cluster``): it creates the dev PKI and the database if
missing, starts replicas r1..rN (``broker serve --replica rI --internal 127.0.0.1:0
--so-reuseport``), each writing var/cluster/rI.log with its pid in var/cluster/rI.pid, and prints
every replica's output prefixed with its name. Ctrl-C (or SIGTERM) is passed on to the replicas.

``rolling-restart`` (``make rolling-restart``, from another terminal) restarts them one at a time:
SIGTERM (the replica drains: health NOT_SERVING, its cameras told to reconnect to the others
spread over the drain window, its sessions ended "broker draining"), wait until it has exited,
start it again with the same command, wait for its "broker serving: ... (replica rI; ...)" line, then the next. With
SO_REUSEPORT the shared ports have no per-replica health; the serving line is printed only after
the replica's listeners are up and its health is SERVING.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STORE = "postgresql://postgres@127.0.0.1:5432/broker"


def cluster_dir(home: Path) -> Path:
    return home / "var" / "cluster"


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database of url when it does not exist yet (dev convenience)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        psycopg.connect(url, connect_timeout=5).close()
        return
    except psycopg.OperationalError as error:
        if "does not exist" not in str(error):
            raise SystemExit(f"cannot reach the store {url}: {error}") from None
    params = conninfo_to_dict(url)
    name = str(params.get("dbname", ""))
    admin = make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # name from our own URL
    print(f"cluster: created database {name}", flush=True)


def broker_command(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "broker.cli", "--home", str(home), *args]


def serve_command(home: Path, name: str, drain_window: float | None) -> list[str]:
    command = broker_command(home, "serve", "--replica", name, "--internal", "127.0.0.1:0")
    command.append("--so-reuseport")
    # One /metrics per replica: r1 on 9464, r2 on 9465, ...
    index = int(name[1:]) if name[1:].isdigit() else 1
    command += ["--metrics-address", f"127.0.0.1:{9463 + index}"]
    if drain_window is not None:
        command += ["--drain-window", f"{drain_window:g}"]
    return command


def spawn(home: Path, name: str) -> subprocess.Popen[bytes]:
    """Start replica name from its saved command; output appended to its log, pid file written."""
    directory = cluster_dir(home)
    saved = json.loads((directory / f"{name}.json").read_text())
    env = {**os.environ, **saved["env"]}
    with open(directory / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            saved["command"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the replicas only through this tool
        )
    (directory / f"{name}.pid").write_text(f"{process.pid}\n")
    return process


def replica_names(home: Path) -> list[str]:
    directory = cluster_dir(home)
    names = [p.stem for p in directory.glob("r*.json")]
    return sorted(names, key=lambda n: (len(n), n))


class Tail:
    """Prints what replicas append to their logs, each line prefixed with the replica name."""

    def __init__(self, home: Path, names: list[str]) -> None:
        self.home = home
        self.offsets = {name: self._size(name) for name in names}

    def _size(self, name: str) -> int:
        path = cluster_dir(self.home) / f"{name}.log"
        return path.stat().st_size if path.exists() else 0

    def pump(self) -> None:
        for name, offset in self.offsets.items():
            path = cluster_dir(self.home) / f"{name}.log"
            if not path.exists():
                continue
            with open(path, "rb") as log:
                log.seek(offset)
                data = log.read()
            end = data.rfind(b"\n") + 1
            if not end:
                continue
            self.offsets[name] = offset + end
            for line in data[:end].decode("utf-8", "replace").splitlines():
                print(f"[{name}] {line}", flush=True)


def cmd_start(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve()
    directory = cluster_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    running = [
        n for n in replica_names(home) if (pid := read_pid(directory / f"{n}.pid")) and alive(pid)
    ]
    if running:
        print(f"cluster: already running ({', '.join(running)}); stop it first", file=sys.stderr)
        return 1
    for stale in directory.glob("r*.*"):
        if stale.suffix in (".json", ".pid"):
            stale.unlink()
    env = {"BROKER_STORE": args.store}
    if args.store.startswith("postgresql://"):
        ensure_database(args.store)
    subprocess.run(broker_command(home, "ca", "init"), env={**os.environ, **env}, check=True)
    names = [f"r{i}" for i in range(1, args.replicas + 1)]
    for name in names:
        saved = {"command": serve_command(home, name, args.drain_window), "env": env}
        (directory / f"{name}.json").write_text(json.dumps(saved))
    tail = Tail(home, names)
    children = [spawn(home, name) for name in names]
    stop: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: stop.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop.append(signum))
    print(f"cluster: {len(names)} replica(s) on {args.store}; logs in {directory}", flush=True)
    forwarded = False
    gone_since: float | None = None
    while True:
        time.sleep(0.2)
        tail.pump()
        for child in children:
            child.poll()  # reap replicas that exited (rolling-restart starts their successors)
        pids = [read_pid(directory / f"{n}.pid") for n in names]
        live = [pid for pid in pids if pid is not None and alive(pid)]
        if stop and not forwarded:
            forwarded = True
            print(f"cluster: passing {signal.Signals(stop[0]).name} to the replicas", flush=True)
            for pid in live:
                os.kill(pid, stop[0])
        if live:
            gone_since = None
            continue
        gone_since = gone_since or time.monotonic()
        if forwarded or time.monotonic() - gone_since > 10:
            break
    tail.pump()
    for name in names:
        (directory / f"{name}.pid").unlink(missing_ok=True)
    statuses = [child.returncode for child in children if child.returncode is not None]
    print("cluster: stopped", flush=True)
    return 0 if forwarded and all(code == 0 for code in statuses) else max([1, *statuses])


def wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def wait_serving(home: Path, name: str, process: subprocess.Popen[bytes], offset: int) -> bool:
    log = cluster_dir(home) / f"{name}.log"
    marker = f"(replica {name};".encode()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(log, "rb") as handle:
            handle.seek(offset)
            for line in handle.read().splitlines():
                if line.startswith(b"broker serving:") and marker in line:
                    print(f"  {line.decode('utf-8', 'replace')}", flush=True)
                    return True
        if process.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def cmd_rolling_restart(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve()
    directory = cluster_dir(home)
    names = replica_names(home)
    if not names:
        print(f"cluster: no cluster in {directory} (start one with make cluster)", file=sys.stderr)
        return 1
    for index, name in enumerate(names):
        pid = read_pid(directory / f"{name}.pid")
        began = time.monotonic()
        if pid is not None and alive(pid):
            print(f"cluster: {name} (pid {pid}): SIGTERM, draining", flush=True)
            os.kill(pid, signal.SIGTERM)
            if not wait_exit(pid, args.drain_timeout):
                print(f"cluster: {name} still running after {args.drain_timeout:g} s: SIGKILL")
                os.kill(pid, signal.SIGKILL)
                wait_exit(pid, 10)
            print(f"cluster: {name} exited after {time.monotonic() - began:.1f} s", flush=True)
        else:
            print(f"cluster: {name} was not running; starting it", flush=True)
        log = directory / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        process = spawn(home, name)
        if not wait_serving(home, name, process, offset):
            print(f"cluster: {name} did not come up (see {log}); stopping here", file=sys.stderr)
            return 1
        print(f"cluster: {name} serving again (pid {process.pid})", flush=True)
        if index + 1 < len(names):
            time.sleep(args.pause)  # let its share of cameras settle before the next drain
    print(f"cluster: rolling restart of {len(names)} replica(s) done", flush=True)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    home = Path(args.home).resolve()
    directory = cluster_dir(home)
    for name in replica_names(home):
        pid = read_pid(directory / f"{name}.pid")
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGTERM)
            print(f"cluster: {name} (pid {pid}): SIGTERM", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--home", default=os.environ.get("BROKER_HOME", "."))
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run N replicas in the foreground")
    start.add_argument("--replicas", "-n", type=int, default=3)
    start.add_argument("--store", default=os.environ.get("BROKER_STORE") or DEFAULT_STORE)
    start.add_argument("--drain-window", type=float, default=None)
    start.set_defaults(func=cmd_start)
    rolling = sub.add_parser("rolling-restart", help="drain and restart one replica at a time")
    rolling.add_argument("--pause", type=float, default=2.0)
    rolling.add_argument(
        "--drain-timeout", type=float, default=120.0, help="SIGKILL a replica still draining"
    )
    rolling.set_defaults(func=cmd_rolling_restart)
    sub.add_parser("stop", help="SIGTERM every replica").set_defaults(func=cmd_stop)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
