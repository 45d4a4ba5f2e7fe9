"""Cameras: enrollment (token or birth certificate), renewal, revocation, ownership (claim, share,
factory reset) and the single-use secrets behind them (I8).

Owns: device records, enrollment tokens, claim codes, grants.
May import: broker.pki, broker.identity, broker.store, broker.audit, broker.accounts (rate limits,
usernames), base modules. Never grpc. Returns typed outcomes.
"""
