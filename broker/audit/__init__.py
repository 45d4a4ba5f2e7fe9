"""The hash-chained audit log (I12): entry format, chain verification, appending in a transaction.

Owns: AuditEvent/AuditEntry, the chain hash, AuditRecorder.
May import: broker.clock, broker.store.base (types only). Never grpc.
"""
