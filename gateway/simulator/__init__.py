"""A stand-in for Exchange's EWS virtual directory, for demos, integration tests and benchmarks.

It shares only the wire constants with the gateway's EWS client, never its code,
so a bug in the client is not mirrored here. Conventions for frontend developers:
an ItemId starting with "missing" is not found; a dial string ending in 486 is
busy and one ending in 480 rings out unanswered. Impersonation finds mailboxes
by their names as Exchange does (`directory`).

May import: `gateway.wire` and the package version, nothing else of the gateway.
"""

from gateway.simulator.server import (
    DEFAULT_BIND,
    SimulatorServer,
    parse_bind,
    serve_forever,
    start_in_thread,
)

__all__ = ["DEFAULT_BIND", "SimulatorServer", "parse_bind", "serve_forever", "start_in_thread"]
