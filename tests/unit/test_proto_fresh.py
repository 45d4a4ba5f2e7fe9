"""The committed generated code under broker/_proto matches what `make proto` produces now."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest

from tools.genproto import ROOT, generate

COMMITTED = ROOT / "broker" / "_proto"
# Hand-written, not produced by the generator.
HANDWRITTEN = {Path("__init__.py")}
STALE = "broker/_proto is stale: run `make proto` and commit the result"


def _generated_files(root: Path) -> set[Path]:
    return {
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    }


def staleness(committed: Path, produced_root: Path, produced: list[Path]) -> list[str]:
    """Why committed differs from a fresh generation into produced_root; empty when fresh."""
    fresh_set = {p.relative_to(produced_root) for p in produced}
    problems = [f"not committed: {p}" for p in sorted(fresh_set) if not (committed / p).is_file()]
    problems += [
        f"committed but no longer generated: {p}"
        for p in sorted(_generated_files(committed) - fresh_set - HANDWRITTEN)
    ]
    for rel in sorted(fresh_set):
        if not (committed / rel).is_file():
            continue
        fresh = (produced_root / rel).read_text()
        old = (committed / rel).read_text()
        if fresh != old:
            diff = difflib.unified_diff(
                old.splitlines(keepends=True),
                fresh.splitlines(keepends=True),
                f"committed/{rel}",
                f"generated/{rel}",
                n=1,
            )
            problems.append(f"differs: {rel}\n" + "".join(list(diff)[:40]))
    return problems


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("proto")
    return out, generate(out)


def test_committed_proto_code_is_fresh(fresh: tuple[Path, list[Path]]) -> None:
    out, produced = fresh
    assert any(p.name.endswith("_pb2.py") for p in produced), "no .proto files under protos/?"
    problems = staleness(COMMITTED, out, produced)
    assert not problems, f"{STALE}:\n" + "\n".join(problems)


def test_staleness_check_is_not_vacuous(fresh: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """A changed, a missing and an orphaned file in the committed tree are each reported."""
    out, produced = fresh
    committed = tmp_path / "committed"
    shutil.copytree(out, committed)
    assert staleness(committed, out, produced) == []

    pb2 = sorted(p.relative_to(out) for p in produced if p.name.endswith("_pb2.py"))
    (committed / pb2[0]).write_text((committed / pb2[0]).read_text() + "# edited by hand\n")
    (committed / pb2[-1]).with_suffix(".pyi").unlink()
    (committed / "broker" / "v1" / "removed_pb2.py").write_text("")
    problems = staleness(committed, out, produced)
    assert [p.splitlines()[0] for p in problems] == [
        f"not committed: {pb2[-1].with_suffix('.pyi')}",
        "committed but no longer generated: broker/v1/removed_pb2.py",
        f"differs: {pb2[0]}",
    ]


def test_generated_imports_point_into_the_private_package(fresh: tuple[Path, list[Path]]) -> None:
    """protoc's ``from broker.v1 import`` would collide with our package; genproto rewrites it."""
    _, produced = fresh
    for path in produced:
        text = path.read_text()
        assert "from broker.v1 import" not in text, path
        assert "import broker.v1" not in text, path
