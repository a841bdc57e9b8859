"""Deciding whether a caller may act, and remembering what it did.

Owns: who the caller is (`callers`), what a request may say (`validation`), which calls a
caller may touch (`ownership`), which numbers may be dialled (`dialing`), per-caller quotas
(`quotas`), idempotent call creation (`idempotency`), the audit trail (`audit`), and the
state the quotas and keys keep: on Redis across replicas (`sharedstate`), else in the
instance's embedded SQLite store (`embeddedstore`). Each takes its own small settings, never
the whole configuration.

May import: `gateway.errors`, `gateway.wire` and the package version.
"""
