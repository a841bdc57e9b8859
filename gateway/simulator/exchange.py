"""The fake Exchange: answer EWS requests from the call book, misbehaving as the rules say."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from gateway import wire
from gateway.simulator.bad_answers import bad_answer
from gateway.simulator.calls import CallBook, is_dialable
from gateway.simulator.deployment import Deployment, authenticated_account
from gateway.simulator.directory import Directory
from gateway.simulator.envelopes import (
    ERROR,
    SUCCESS,
    WARNING,
    OperationResult,
    SipResponse,
    operation_response,
    soap_fault,
)
from gateway.simulator.faults import FaultBook
from gateway.simulator.idle import IdlePolicy
from gateway.simulator.journal import RecordedRequest, RequestJournal
from gateway.simulator.outcomes import Outcome, Reply
from gateway.simulator.parsing import ConnectingSid, EwsRequest, RequestRejected, read_request
from gateway.simulator.schema import EwsSchema

# Frontend developers get "item not found" by asking for an item whose id starts with this.
MISSING_ITEM_PREFIX = "missing"

UNKNOWN_CALL = OperationResult(
    ERROR, wire.ERROR_INVALID_PHONE_CALL_ID, "The phone call ID is not valid."
)
MISSING_ITEM = OperationResult(
    ERROR, wire.ERROR_ITEM_NOT_FOUND, "The specified object was not found in the store."
)
UNDIALABLE = OperationResult(
    ERROR, wire.ERROR_INVALID_PHONE_NUMBER, "The phone number is not a valid dial string."
)


_Operation = Callable[[EwsRequest, str | None, CallBook], OperationResult]


class FakeExchange:
    """Answer the three Unified Messaging operations like Exchange's EWS endpoint."""

    def __init__(
        self,
        *,
        calls: CallBook,
        faults: FaultBook,
        journal: RequestJournal,
        schema: EwsSchema | None = None,
        latency_ms: int = 0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        deployment: Deployment | None = None,
        directory: Directory | None = None,
    ) -> None:
        if latency_ms < 0:
            raise ValueError(f"latency_ms must not be negative, not {latency_ms!r}")
        self.calls = calls
        # Several mailbox servers behind a front end; None: one server holding `calls`.
        self.deployment = deployment
        self.directory = directory or Directory()
        # How idle kept-alive connections end; None: after the handler's long default.
        self.idle_policy: IdlePolicy | None = None
        self.faults = faults
        self.journal = journal
        self._schema = schema
        self._latency_s = latency_ms / 1000
        self._sleep = sleep
        self._clock = clock
        self._operations: dict[str, _Operation] = {
            wire.PLAY_ON_PHONE: self._play_on_phone,
            wire.GET_PHONE_CALL_INFORMATION: self._get_phone_call_information,
            wire.DISCONNECT_PHONE_CALL: self._disconnect_phone_call,
        }

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
        """Record the request, then answer it or misbehave as the first firing rule says.

        With a latency, the answer is held until that long after RECEIVED_AT (the moment
        the request arrived, by the `clock`; now if not given): reading and answering the
        request take part of the latency rather than adding to it, as with a real server.
        """
        due = (self._clock() if received_at is None else received_at) + self._latency_s
        outcome = self._answer_now(body, soap_action, request_id, authorization, anchor_mailbox)
        if self._latency_s and (left := due - self._clock()) > 0:
            self._sleep(left)
        return outcome

    def _answer_now(
        self,
        body: bytes,
        soap_action: str | None,
        request_id: str | None,
        authorization: str | None,
        anchor_mailbox: str | None = None,
    ) -> Outcome:
        try:
            request = read_request(body, soap_action, self._schema)
        except RequestRejected as rejected:
            self.journal.record(
                RecordedRequest(
                    rejected.operation, request_id, None, soap_action, body, authorization
                )
            )
            return Reply(500, soap_fault(wire.ERROR_SCHEMA_VALIDATION, rejected.message))
        mailbox = None
        if request.impersonated is not None:
            mailbox = self.directory.impersonated(*request.impersonated)
        anchor = None if anchor_mailbox is None else self.directory.anchored(anchor_mailbox)
        place = _Placement(mailbox, authorization, anchor, self.deployment)
        self.journal.record(
            RecordedRequest(
                request.operation,
                request_id,
                mailbox,
                soap_action,
                body,
                authorization,
                anchor_mailbox,
                place.server,
                place.home,
            )
        )
        if request.impersonated is not None and mailbox is None:
            return Reply(500, _no_such_mailbox(request.impersonated))
        return self._answer_with_faults(request, mailbox, place)

    def _answer_with_faults(
        self, request: EwsRequest, mailbox: str | None, place: _Placement
    ) -> Outcome:
        """Answer as the fault rule due for this operation says, if any."""
        fired = self.faults.pick(request.operation)
        if fired is None:
            return self._perform(request, mailbox, place)
        if fired.rule.kind == "latency":
            self._sleep((fired.rule.number("ms") or 0) / 1000)
            return self._perform(request, mailbox, place)
        if fired.rule.kind == "warning":
            return self._perform(request, mailbox, place, warning=fired.rule.text("message"))
        if fired.rule.kind == "sip":
            sip = SipResponse(fired.rule.number("code"), fired.rule.optional_text("text"))
            return self._perform(request, mailbox, place, sip=sip)
        return bad_answer(fired, request.operation)

    def _perform(
        self,
        request: EwsRequest,
        mailbox: str | None,
        place: _Placement,
        *,
        warning: str | None = None,
        sip: SipResponse | None = None,
    ) -> Reply:
        calls = self._calls_for(request, place)
        result = self._operations[request.operation](request, mailbox, calls)
        if warning is not None and result.response_class == SUCCESS:
            result = replace(result, response_class=WARNING, message_text=warning)
        if sip is not None and result.phase is not None:
            result = replace(result, sip=sip)
        headers = Deployment.diagnostics(place.server) if place.server else ()
        return Reply(200, operation_response(request.operation, result), headers=headers)

    def _calls_for(self, request: EwsRequest, place: _Placement) -> CallBook:
        """Return the call book an operation works on: one server's, with several."""
        if self.deployment is None or place.server is None or place.home is None:
            return self.calls
        # A new call lives where its mailbox lives; the others look only where they were sent.
        server = place.home if request.operation == wire.PLAY_ON_PHONE else place.server
        return self.deployment.servers[server]

    def _play_on_phone(
        self, request: EwsRequest, mailbox: str | None, calls: CallBook
    ) -> OperationResult:
        item_id = request.item_id or ""
        if not item_id or item_id.startswith(MISSING_ITEM_PREFIX):
            return MISSING_ITEM
        dial_string = request.dial_string or ""
        if not is_dialable(dial_string):
            return UNDIALABLE
        call = calls.place(mailbox, dial_string)
        return OperationResult(phone_call_id=call.call_id)

    def _get_phone_call_information(
        self, request: EwsRequest, mailbox: str | None, calls: CallBook
    ) -> OperationResult:
        call = calls.look_up(mailbox, request.phone_call_id or "")
        return UNKNOWN_CALL if call is None else OperationResult(phase=call.phase)

    def _disconnect_phone_call(
        self, request: EwsRequest, mailbox: str | None, calls: CallBook
    ) -> OperationResult:
        call = calls.hang_up(mailbox, request.phone_call_id or "")
        return UNKNOWN_CALL if call is None else OperationResult()


class _Placement:
    """Where a request goes among several mailbox servers: routed, and its mailbox's home."""

    __slots__ = ("home", "server")

    def __init__(
        self,
        mailbox: str | None,
        authorization: str | None,
        anchor_mailbox: str | None,
        deployment: Deployment | None,
    ) -> None:
        self.server: str | None = None
        self.home: str | None = None
        if deployment is not None:
            self.server = deployment.route(anchor_mailbox, authorization)
            self.home = deployment.home_of(mailbox or authenticated_account(authorization))


def _no_such_mailbox(impersonated: ConnectingSid) -> bytes:
    """Return the SOAP fault Exchange answers a ConnectingSID that names no mailbox with.

    ErrorNonExistentMailbox, not ErrorImpersonateUserDenied: Microsoft's ResponseCode
    reference gives the first for an address that "does not refer to a valid account ... in
    the SOAP header, such as in an Exchange Impersonation call", the second for an account
    lacking the right to impersonate a user it found. Impersonation is read before the
    operation runs, so it is a SOAP fault, with Exchange's wording for an SMTP address.
    """
    named = "SMTP address" if impersonated.kind.endswith("SmtpAddress") else impersonated.kind
    return soap_fault(
        wire.ERROR_NON_EXISTENT_MAILBOX, f"The {named} has no mailbox associated with it."
    )
