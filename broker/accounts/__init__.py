"""Users and app instances: sign-up, password login (argon2id, I11), app certificates, sign-out,
login rate limits.

Owns: users, app instances, password hashes, failed-login budgets.
May import: broker.pki, broker.identity, broker.store, broker.audit,
base modules. Never grpc. Returns typed outcomes (broker.outcomes) for what must end live.
"""
