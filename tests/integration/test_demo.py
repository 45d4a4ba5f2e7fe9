"""`make demo` must tell its story and exit 0 on a fresh home."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_tells_its_story():
    result = subprocess.run(
        [sys.executable, "-m", "broker.dev.demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "ben decrypted 30 frames end to end" in out
    assert "0 rejected" in out
    assert "mallory denied: PERMISSION_DENIED" in out
    assert "'device revoked'" in out
    assert "camera's Attach stream ended: UNAUTHENTICATED" in out
    assert "demo complete" in out
