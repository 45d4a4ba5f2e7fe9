"""Who is calling: verified certificates to typed identities (I1), validation of ids.

Owns: Identity and Kind, the one place a peer certificate becomes an identity.
May import: broker.protocol, broker.errors. Never grpc.
"""
