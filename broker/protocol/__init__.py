"""Wire formats shared with camera and app SDKs: session tokens, the end-to-end handshake and
frames, SPIFFE IDs, accepted key types. Normative text: docs/PROTOCOL.md.

Owns: everything a firmware author must reproduce byte for byte.
May import: broker.errors, broker.clock, broker.pemfile (and cryptography, PyJWT). Never grpc,
never another core package: the SDKs depend on this package alone.
"""
