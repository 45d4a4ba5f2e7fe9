"""The certificate authority side: CA material, CSR checks (I2), issuance records, CRLs, rotations,
the trust bundle, and reloading a rotated PKI into a live broker.

Owns: certs/ on disk and the issued-certificate book in the store.
May import: broker.identity, broker.protocol, broker.store, broker.audit, base modules (config,
errors, clock, pemfile, outcomes). Never grpc, never accounts/devices/sessions.
"""
