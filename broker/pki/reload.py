"""Picking up a rotated PKI on a live broker (``AdminService.ReloadPki`` after a make target).

Runs on the core thread: swaps the issuing CA and the token keys, reads the new trust bundle, and
returns what must change live (bundle push, streams whose certificate no longer chains to a
trusted issuing CA) as an ``Effects`` value for the event loop to apply. A reload asked for here
appends a ``pki.reloaded`` event so every other replica re-reads certs/ too (token-key rotation
included); a reload done because of that event does not announce it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from broker.clock import Clock, SystemClock, now_ms
from broker.cluster.events import PKI_RELOADED, pki_reloaded_payload
from broker.config import Config
from broker.outcomes import Effects, TrustChanged
from broker.pemfile import read_certificates, read_private_key
from broker.pki.ca import IssuingAuthority, PkiFiles, serial_hex
from broker.pki.rotation import trusted_issuing
from broker.pki.trust import TrustBundle, load_trust_bundle
from broker.protocol.tokens import TokenKeyring, load_keyring
from broker.store import Store


@dataclass(frozen=True, slots=True)
class PkiReloaded:
    """Outcome of a reload: the bundle now served, the issuing CA now signing, and effects."""

    bundle: TrustBundle
    issuing_serial: str
    effects: Effects


class PkiReloader:
    """Re-reads certs/ into the running authorities."""

    def __init__(
        self,
        config: Config,
        authority: IssuingAuthority,
        on_keyring: Callable[[TokenKeyring], None],
        store: Store | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._config = config
        self._authority = authority
        self._on_keyring = on_keyring
        self._store = store  # where the pki.reloaded event goes (None: a lone broker, no event)
        self._clock = clock or SystemClock()

    def reload(self, current_version: str, *, announce: bool = True) -> PkiReloaded:
        """Load the rotated material; current_version is the bundle the event loop serves now.
        With announce, append a pki.reloaded event once the new material has been read."""
        files = PkiFiles(self._config.certs_dir)
        self._authority.replace(
            read_private_key(files.issuing_key), read_certificates(files.issuing_cert)[0]
        )
        keyring = load_keyring(self._config.certs_dir)
        self._on_keyring(keyring)
        bundle = load_trust_bundle(self._config, keyring.jwks_json())
        trust = TrustChanged(
            bundle, bundle.version != current_version, tuple(trusted_issuing(files))
        )
        if announce and self._store is not None:
            at_ms = now_ms(self._clock)
            payload = pki_reloaded_payload(bundle.version)
            origin = self._config.replica_name
            self._store.run(lambda tx: tx.append_event(PKI_RELOADED, payload, origin, at_ms))
        return PkiReloaded(
            bundle,
            serial_hex(self._authority.certificate.serial_number),
            Effects(trust=trust, revocations_changed=True),
        )
