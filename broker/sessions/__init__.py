"""Live viewing: opening sessions and minting tokens (I5), the relay with its per-frame identity
check (I6), presence of Attach streams, and ending sessions in the store.

Owns: session records, the relay and presence (event-loop objects: asyncio only, no grpc).
May import: broker.protocol, broker.identity, broker.store, broker.audit, broker.devices.ownership,
base modules. Never grpc.
"""
