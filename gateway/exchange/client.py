"""Exchange Web Services calls: envelope out, answer back, every outcome observed.

Envelopes come from gateway.exchange.envelopes (zeep, driven by the project's WSDL) and
answers are read by gateway.exchange.replies; this module sends one through the
transport under the upstream policy (deadline, bulkhead, circuit breaker and
one retry of Exchange's short back-offs) and reports each call to an observer.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gateway import wire
from gateway.errors import ExchangeOutcome, GatewayError, GatewayOverloaded
from gateway.exchange import replies
from gateway.exchange.envelopes import EnvelopeBuilder
from gateway.exchange.replies import CallInformation, Disconnected, EwsAnswer, PlacedCall
from gateway.exchange.resilience import IDEMPOTENT_OPERATIONS, ExchangePolicy
from gateway.exchange.transport import ExchangeReply

CONTENT_TYPE = "text/xml; charset=utf-8"
# The version (4) and variant (10) bits of a random GUID (RFC 9562).
_GUID_CLEAR = ~((0xF << 76) | (0x3 << 62))
_GUID_VERSION_4 = (0x4 << 76) | (0x2 << 62)


class Transport(Protocol):
    """Sends one envelope to Exchange (transport.ExchangeTransport in production)."""

    def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        deadline: float | None = None,
        idempotent: bool = False,
    ) -> ExchangeReply:
        """Return Exchange's whole answer by the deadline (monotonic), or raise a GatewayError.

        idempotent: the request may be sent again if a reused connection closes unanswered.
        """


@dataclass(frozen=True, slots=True)
class ExchangeCallReport:
    """What one call to Exchange did: one per attempt, and one for a call refused unsent."""

    operation: str
    outcome: ExchangeOutcome
    code: str | None  # Exchange's ResponseCode, when it gave one
    seconds: float  # from the attempt's start to its end
    started_ns: int  # wall clock (time.time_ns) at the start, for the trace
    client_request_id: str  # the client-request-id header sent
    reply: ExchangeReply | None  # Exchange's HTTP answer, when one arrived


class ExchangeObserver(Protocol):
    """Hears of every call to Exchange (gateway.telemetry.exchange_calls implements it for
    metrics, traces and the request's log line)."""

    def exchange_call(self, report: ExchangeCallReport) -> None:
        """Record one call to Exchange."""


class PhoneCalls(Protocol):
    """The phone-call operations the HTTP layer needs (EwsClient, or a fake in tests)."""

    def disconnect_call(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> Disconnected:
        """Hang up a call."""

    def play_on_phone(
        self,
        item_id: str,
        dial_string: str,
        *,
        request_id: str,
        change_key: str | None = None,
        mailbox: str | None = None,
    ) -> PlacedCall:
        """Start a call."""

    def get_call_information(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> CallInformation:
        """Read the state of a call."""


class EwsClient:
    """Call the Unified Messaging operations of one Exchange server."""

    def __init__(
        self,
        transport: Transport,
        *,
        server_version: str,
        anchor_mailbox: str | None = None,
        impersonation_id: str = "smtp",
        observer: ExchangeObserver | None = None,
        policy: ExchangePolicy | None = None,
    ) -> None:
        self._envelopes = EnvelopeBuilder(server_version, impersonation_id)
        self._anchor_mailbox = anchor_mailbox
        # X-AnchorMailbox takes an SMTP address or a UPN; an SID cannot anchor a call.
        self._anchors_on_mailbox = impersonation_id in ("smtp", "upn")
        self._guids = GuidSequence()
        self._transport = transport
        self._observer = observer
        self._policy = policy or ExchangePolicy()

    def disconnect_call(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> Disconnected:
        """Hang up a call (DisconnectPhoneCall)."""
        body = {"PhoneCallId": {"Id": call_id}}
        return self._invoke(
            wire.DISCONNECT_PHONE_CALL, body, request_id, mailbox, replies.disconnected
        )

    def play_on_phone(
        self,
        item_id: str,
        dial_string: str,
        *,
        request_id: str,
        change_key: str | None = None,
        mailbox: str | None = None,
    ) -> PlacedCall:
        """Dial a phone and play a voice item to it (PlayOnPhone)."""
        body = {"ItemId": {"Id": item_id, "ChangeKey": change_key}, "DialString": dial_string}
        return self._invoke(wire.PLAY_ON_PHONE, body, request_id, mailbox, replies.placed_call)

    def get_call_information(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> CallInformation:
        """Read the state of a call (GetPhoneCallInformation)."""
        body = {"PhoneCallId": {"Id": call_id}}
        return self._invoke(
            wire.GET_PHONE_CALL_INFORMATION, body, request_id, mailbox, replies.call_information
        )

    def build_envelope(
        self, operation: str, body: Mapping[str, Any], mailbox: str | None = None
    ) -> bytes:
        """Serialize the SOAP envelope for an operation, headers included."""
        return self._envelopes.build(operation, body, mailbox)

    def _invoke(
        self,
        operation: str,
        body: Mapping[str, Any],
        request_id: str,
        mailbox: str | None,
        read_result: Callable[[EwsAnswer], ResultT],
    ) -> ResultT:
        """Send one operation and read its result; every outcome is observed once."""
        envelope = self.build_envelope(operation, body, mailbox)
        headers = self._headers(operation, request_id, mailbox)
        deadline = time.monotonic() + self._policy.timeout_s
        started = time.perf_counter(), time.time_ns()
        try:
            with self._policy.call_slot():
                result = self._attempts(operation, envelope, headers, deadline, read_result)
        except GatewayOverloaded as error:
            outcome = error.outcome or ExchangeOutcome.REJECTED
            self._observe(operation, outcome, None, started, headers, reply=None)
            raise
        return result

    def _headers(self, operation: str, request_id: str, mailbox: str | None) -> dict[str, str]:
        """Return the fields Microsoft asks EWS clients to send, for routing and correlation."""
        client_request_id = self._guids.next()
        headers = {
            "Content-Type": CONTENT_TYPE,
            "SOAPAction": f'"{wire.soap_action(operation)}"',
            "X-Request-ID": request_id,
            "client-request-id": client_request_id,
        }
        # Exchange 2013+ front ends route by it to the mailbox's own server. An address an
        # HTTP header cannot carry as ASCII goes without: routed by the account instead.
        anchor = mailbox if mailbox and self._anchors_on_mailbox else self._anchor_mailbox
        if anchor and anchor.isascii():
            headers["X-AnchorMailbox"] = anchor
        return headers

    def _attempt(
        self,
        operation: str,
        envelope: bytes,
        headers: Mapping[str, str],
        deadline: float,
        read_result: Callable[[EwsAnswer], ResultT],
    ) -> ResultT:
        """Make one call to Exchange and read its result; every outcome is observed once."""
        started = time.perf_counter(), time.time_ns()
        reply = None
        try:
            with self._policy.guard():
                reply = self._transport.post(
                    envelope,
                    headers,
                    deadline=deadline,
                    idempotent=operation in IDEMPOTENT_OPERATIONS,
                )
            answer = replies.read_ews_answer(operation, reply)
            result = read_result(answer)
        except GatewayError as error:
            if reply is not None:
                error.upstream_status = reply.status
            outcome = error.outcome or ExchangeOutcome.INVALID_RESPONSE
            self._observe(operation, outcome, error.ews_code, started, headers, reply=reply)
            raise
        self._observe(
            operation, ExchangeOutcome.SUCCESS, answer.code, started, headers, reply=reply
        )
        return result

    def _attempts(
        self,
        operation: str,
        envelope: bytes,
        headers: Mapping[str, str],
        deadline: float,
        read_result: Callable[[EwsAnswer], ResultT],
    ) -> ResultT:
        """Make the call, and once more after Exchange's back-off where the policy allows.

        A plain loop rather than tenacity's Retrying: the same rule (at most two attempts, the
        second only when ExchangePolicy.may_retry says so, after Exchange's own back-off)
        without tenacity's 22 µs per call (benchmarks/RESULTS.md).
        """
        try:
            return self._attempt(operation, envelope, headers, deadline, read_result)
        except GatewayError as error:
            if not self._policy.may_retry(operation, error, deadline):
                raise
            time.sleep(error.back_off_s or 0.0)
        return self._attempt(operation, envelope, headers, deadline, read_result)

    def _observe(
        self,
        operation: str,
        outcome: ExchangeOutcome,
        code: str | None,
        started: tuple[float, int],
        headers: Mapping[str, str],
        *,
        reply: ExchangeReply | None,
    ) -> None:
        if self._observer is not None:
            report = ExchangeCallReport(
                operation,
                outcome,
                code,
                time.perf_counter() - started[0],
                started[1],
                headers["client-request-id"],
                reply,
            )
            self._observer.exchange_call(report)


ResultT = TypeVar("ResultT")


class GuidSequence:
    """Version 4 GUIDs (RFC 9562), unique across processes, cheap on every call.

    A random prefix per process (74 random bits in the version 4 layout) and a counter for
    the last 48 bits: no system call and no formatting of 128 bits per call, where uuid4
    reads the kernel's random source each time (0.65 against 2.15 µs, benchmarks/RESULTS.md).
    The prefix is drawn again in a forked child (gunicorn's workers). SEPARATOR goes between
    the GUID's groups: "-" for client-request-id, "" for uuid4().hex's shape. The ids
    correlate requests and logs; they are no secret.
    """

    def __init__(self, separator: str = "-") -> None:
        self._separator = separator
        self._pid = -1
        self._prefix = ""
        self._counter = itertools.count()

    def next(self) -> str:
        """Return a new GUID."""
        if self._pid != os.getpid():
            self._start()
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"

    def _start(self) -> None:
        bits = secrets.randbits(128) & _GUID_CLEAR | _GUID_VERSION_4
        text = f"{bits:032x}"
        groups = (text[:8], text[8:12], text[12:16], text[16:20], "")
        self._prefix = self._separator.join(groups)
        self._counter = itertools.count()
        self._pid = os.getpid()
