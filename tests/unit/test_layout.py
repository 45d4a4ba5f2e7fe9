"""The layout on disk is the architecture (issue 9): each core package imports only the packages
below it, no core package imports grpc, and the SDKs depend on the protocol package alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BROKER = Path(__file__).resolve().parents[2] / "broker"
BASE = {"errors", "clock", "config", "pemfile", "outcomes"}
# Core package -> broker packages (besides itself and the base modules) it may import.
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "identity": {"protocol"},
    "audit": {"store"},
    "store": {"audit", "identity", "protocol"},
    "cluster": {"store"},
    "pki": {"identity", "protocol", "store", "audit", "cluster"},
    "accounts": {"pki", "identity", "protocol", "store", "audit", "cluster"},
    "devices": {"pki", "identity", "protocol", "store", "audit", "accounts", "cluster"},
    "sessions": {"pki", "identity", "protocol", "store", "audit", "devices", "cluster"},
}
# The SDKs: wire formats and base modules only (the operator SDK also reads the PKI home layout).
CLIENT_ALLOWED = {"protocol", "client", "_proto"}
CLIENT_EXCEPTIONS = {("admin", "pki")}


def broker_imports(path: Path) -> set[str]:
    """Top-level broker packages/modules imported by one file (at any depth)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "broker" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] == "grpc" or parts[0].startswith("grpc_"):
                found.add("grpc")
    return found


def files_of(package: str) -> list[Path]:
    return sorted((BROKER / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_core_package_imports_only_what_its_layer_allows(package: str) -> None:
    allowed = ALLOWED[package] | BASE | {package}
    for path in files_of(package):
        extra = broker_imports(path) - allowed
        assert not extra, f"{path.relative_to(BROKER)} imports {sorted(extra)}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_core_package_never_imports_grpc(package: str) -> None:
    for path in files_of(package):
        assert "grpc" not in broker_imports(path), path


def test_sdks_import_only_the_protocol_package_and_base_modules() -> None:
    for path in files_of("client"):
        extra = broker_imports(path) - CLIENT_ALLOWED - BASE - {"grpc"}
        extra -= {pkg for module, pkg in CLIENT_EXCEPTIONS if path.stem == module}
        assert not extra, f"client/{path.name} imports core packages {sorted(extra)}"


def test_every_subpackage_docstring_says_what_it_may_import() -> None:
    for package in [*ALLOWED, "dev"]:
        doc = ast.get_docstring(ast.parse((BROKER / package / "__init__.py").read_text())) or ""
        assert "May import" in doc, package
