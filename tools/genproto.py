"""Regenerate broker/_proto from protos/ (used by `make proto` and the staleness test).

protoc names generated imports after the proto package path (``broker.v1``, ``broker.internal.v1``),
which would collide with our own ``broker`` package, so the imports are rewritten to
``broker._proto.broker.v1`` and ``broker._proto.broker.internal.v1``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
IMPORT_RE = re.compile(r"^from broker\.((?:internal\.)?v1) import", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Generate Python, stubs and gRPC code for every proto into out_dir; return the files."""
    from grpc_tools import protoc  # dev dependency, imported only when generating

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    files = sorted(p for p in out_dir.rglob("*.py*") if p.suffix in (".py", ".pyi"))
    for path in files:
        text = IMPORT_RE.sub(r"from broker._proto.broker.\1 import", path.read_text())
        path.write_text(text)
    packages = (out_dir / "broker", out_dir / "broker" / "v1")
    packages += (out_dir / "broker" / "internal", out_dir / "broker" / "internal" / "v1")
    for pkg in packages:
        (pkg / "__init__.py").write_text("")
    return sorted(p for p in out_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "broker" / "_proto"
    generate(target)
    print(f"generated into {target}")
