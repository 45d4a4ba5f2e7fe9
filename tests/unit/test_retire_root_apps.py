"""retire-root must not lock out app instances still on an old-root certificate (I7 ops safety)."""

from __future__ import annotations

import pytest

from broker.errors import FailedPrecondition
from broker.rotation import retire_root, rotate_root
from tests.helpers import csr_for, p256
from tests.unit.test_crl import Core, core  # noqa: F401 (fixture)


def test_retire_root_refuses_while_an_app_holds_an_old_root_certificate(core: Core) -> None:
    app, _ = core.app("anna")
    rotate_root(core.pki.config, core.pki.clock)
    core.reload()
    with pytest.raises(FailedPrecondition) as refused:
        retire_root(core.pki.config, core.store, "", force=False, clock=core.pki.clock)
    assert f"1 app instance(s) still hold a certificate under the old root ({app.app_id})" in (
        refused.value.message
    )
    assert (core.pki.files.root / "root-cross.pem").exists()  # nothing retired

    core.accounts.renew_app(app, csr_for(p256()))  # now from the new issuing CA
    report = retire_root(core.pki.config, core.store, "", force=False, clock=core.pki.clock)
    assert report.details["old_chain_apps"] == []
    assert not (core.pki.files.root / "root-cross.pem").exists()
