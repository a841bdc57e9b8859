"""A fake EWS client for API tests: it records each call and answers as configured."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.exchange.client import CallInformation, Disconnected, PlacedCall


@dataclass
class Call:
    """One call the API made on the fake Exchange."""

    operation: str
    arguments: dict[str, Any]


@dataclass
class FakeExchange:
    """Stands in for EwsClient: records calls, answers as configured or raises `error`."""

    disconnected: Disconnected = field(default_factory=lambda: Disconnected(ews_code="NoError"))
    placed: PlacedCall = field(
        default_factory=lambda: PlacedCall(call_id="call-1", ews_code="NoError")
    )
    information: CallInformation = field(
        default_factory=lambda: CallInformation(
            state="Connected",
            connection_failure_cause="None",
            sip_response_code=None,
            sip_response_text=None,
            ews_code="NoError",
        )
    )
    error: Exception | None = None
    calls: list[Call] = field(default_factory=list)

    def disconnect_call(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> Disconnected:
        self._record("disconnect_call", call_id=call_id, request_id=request_id, mailbox=mailbox)
        return self.disconnected

    def play_on_phone(
        self,
        item_id: str,
        dial_string: str,
        *,
        request_id: str,
        change_key: str | None = None,
        mailbox: str | None = None,
    ) -> PlacedCall:
        self._record(
            "play_on_phone",
            item_id=item_id,
            dial_string=dial_string,
            request_id=request_id,
            change_key=change_key,
            mailbox=mailbox,
        )
        return self.placed

    def get_call_information(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> CallInformation:
        self._record(
            "get_call_information", call_id=call_id, request_id=request_id, mailbox=mailbox
        )
        return self.information

    def _record(self, operation: str, **arguments: Any) -> None:
        self.calls.append(Call(operation, arguments))
        if self.error is not None:
            raise self.error

    @property
    def last(self) -> Call:
        assert self.calls, "Exchange was never called"
        return self.calls[-1]
