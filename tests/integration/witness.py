"""The EWS simulator plus a witness: a line per EWS request naming the fault rule that fired.

The simulator's own request journal keeps only the last 20,000 requests and does not say which
rule fired, so a soak cannot tell from it what a given caller should have got. This wraps the
simulator's public parts (FakeExchange, FaultBook, HttpServer) without changing them: the
fault book remembers, per handler thread, the rule it picked, and the exchange writes
"<X-Request-ID>\\t<label>\\t<wall-clock time>" for every request as its answer is ready to go
out. Labels are `none`, `unread` (the simulator could not read the envelope) or the rule's
kind, with its `code` for `ews-error` and `fault` (e.g. `ews-error:ErrorAccessDenied`). The
time tells a soak whether the simulator itself answered late (a starved CI machine), in which
case a 504 is the contract's answer even though no fault fired.

Run `python -m tests.integration.witness --bind 127.0.0.1:PORT --witness FILE`; fault rules
are set through the usual control API (PUT /simulator/faults).
"""

from __future__ import annotations

import argparse
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from gateway.simulator.calls import CallBook
from gateway.simulator.exchange import FakeExchange
from gateway.simulator.faults import FaultBook, FiredRule
from gateway.simulator.handler import HttpServer
from gateway.simulator.journal import RequestJournal
from gateway.simulator.outcomes import Outcome
from gateway.simulator.server import parse_bind

NO_FAULT = "none"
UNREAD = "unread"
_NOT_PICKED = object()


def rule_label(kind: str, code: str | None = None) -> str:
    """Name a fault rule as the witness writes it."""
    return f"{kind}:{code}" if code else kind


class WitnessFaultBook(FaultBook):
    """A FaultBook that remembers, for the calling thread, what its last pick returned."""

    def __init__(self) -> None:
        super().__init__()
        self._picked = threading.local()

    def pick(self, operation: str) -> FiredRule | None:
        fired = super().pick(operation)
        self._picked.value = fired
        return fired

    def forget_pick(self) -> None:
        self._picked.value = _NOT_PICKED

    def last_pick(self) -> object:
        return getattr(self._picked, "value", _NOT_PICKED)


class WitnessedExchange(FakeExchange):
    """A FakeExchange that writes which rule answered each request."""

    def __init__(self, witness: TextIO) -> None:
        self._witness_book = WitnessFaultBook()
        super().__init__(
            calls=CallBook(step_seconds=0.2), faults=self._witness_book, journal=RequestJournal()
        )
        self._witness = witness
        self._lock = threading.Lock()

    def answer(
        self,
        body: bytes,
        soap_action: str | None,
        request_id: str | None,
        authorization: str | None = None,
        received_at: float | None = None,
        *,
        anchor_mailbox: str | None = None,
    ) -> Outcome:
        self._witness_book.forget_pick()
        outcome = super().answer(
            body,
            soap_action,
            request_id,
            authorization,
            received_at,
            anchor_mailbox=anchor_mailbox,
        )
        line = f"{request_id}\t{_label(self._witness_book.last_pick())}\t{time.time():.6f}\n"
        with self._lock:
            self._witness.write(line)
            self._witness.flush()
        return outcome


def _label(picked: object) -> str:
    if picked is _NOT_PICKED:
        return UNREAD  # answered with ErrorSchemaValidation before any rule was consulted
    if picked is None:
        return NO_FAULT
    assert isinstance(picked, FiredRule)
    code = picked.rule.params.get("code")
    return rule_label(picked.rule.kind, str(code) if code is not None else None)


@dataclass(frozen=True)
class Attempt:
    """One request that reached the simulator: the rule that answered it, and when."""

    label: str
    answered_at: float  # time.time() when the answer was ready to be sent


def read_witness(path: Path) -> dict[str, list[Attempt]]:
    """Return the attempts seen for each request id, in the order they arrived."""
    attempts: dict[str, list[Attempt]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        request_id, label, answered_at = line.split("\t")
        attempts.setdefault(request_id, []).append(Attempt(label, float(answered_at)))
    return attempts


def serve(bind: str, witness_path: Path) -> None:
    """Serve until SIGTERM or Ctrl-C, releasing hanging answers on the way out."""
    host, port = parse_bind(bind)
    with witness_path.open("a", encoding="utf-8") as witness:
        exchange = WitnessedExchange(witness)
        httpd = HttpServer((host, port), socket.AF_INET, exchange)

        def stop(_signum: int, _frame: FrameType | None) -> None:
            exchange.faults.release_hangs()
            # shutdown() waits for serve_forever, which runs in this very thread.
            threading.Thread(target=httpd.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        try:
            httpd.serve_forever(0.05)
        except KeyboardInterrupt:
            pass
        finally:
            exchange.faults.release_hangs()
            httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", required=True, help="HOST:PORT on IPv4 loopback")
    parser.add_argument("--witness", required=True, type=Path, help="file to append lines to")
    args = parser.parse_args()
    serve(args.bind, args.witness)


if __name__ == "__main__":
    main()
