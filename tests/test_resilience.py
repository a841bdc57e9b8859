"""Deadlines, the one retry, the circuit breaker and the bulkhead."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway import wire
from gateway.errors import (
    CircuitOpen,
    ExchangeBusy,
    ExchangeTimeout,
    ExchangeUnavailable,
    ExchangeUnreachable,
    GatewayError,
    GatewayOverloaded,
)
from gateway.exchange.client import EwsClient
from gateway.exchange.resilience import BreakerState, Bulkhead, CircuitBreaker, ExchangePolicy
from gateway.exchange.transport import ExchangeReply

FIXTURES = Path(__file__).parent / "fixtures"
BUSY_FAULT = (FIXTURES / "fault_server_busy.xml").read_bytes()
DISCONNECTED = (FIXTURES / "disconnect_success.xml").read_bytes()
PLACED = (FIXTURES / "play_on_phone_success.xml").read_bytes()


def busy_for(milliseconds: int) -> bytes:
    return BUSY_FAULT.replace(b">297749<", f">{milliseconds}<".encode())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedExchange:
    """Answers each post with the next scripted reply, or raises the next scripted error."""

    script: list[ExchangeReply | GatewayError]
    deadlines: list[float | None] = field(default_factory=list)

    def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        deadline: float | None = None,
        idempotent: bool = False,
    ) -> ExchangeReply:
        self.deadlines.append(deadline)
        step = self.script.pop(0)
        if isinstance(step, GatewayError):
            raise step
        return step


def reply(body: bytes, status: int = 200, retry_after: str | None = None) -> ExchangeReply:
    return ExchangeReply(status, "text/xml; charset=utf-8", retry_after, None, body)


# The circuit breaker


def breaker(clock: Clock, changes: list[BreakerState] | None = None) -> CircuitBreaker:
    on_change = changes.append if changes is not None else None
    return CircuitBreaker(3, 30, clock=clock, on_change=on_change)


def test_the_breaker_opens_after_the_threshold_of_consecutive_failures() -> None:
    clock, changes = Clock(), []
    circuit = breaker(clock, changes)
    for _ in range(3):
        circuit.before_call()
        circuit.record_failure()
    with pytest.raises(CircuitOpen) as raised:
        circuit.before_call()
    assert raised.value.retry_after_s == 30
    assert raised.value.outcome == "rejected"
    assert changes == [BreakerState.OPEN]


def test_an_answer_from_exchange_resets_the_failure_count() -> None:
    circuit = breaker(Clock())
    for _ in range(2):
        circuit.record_failure()
    circuit.record_success()
    for _ in range(2):
        circuit.record_failure()
    circuit.before_call()
    assert circuit.state is BreakerState.CLOSED


def test_after_the_cooldown_exactly_one_probe_goes_through() -> None:
    clock = Clock()
    circuit = breaker(clock)
    for _ in range(3):
        circuit.record_failure()
    clock.now += 30
    circuit.before_call()
    assert circuit.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen):
        circuit.before_call()


def test_a_successful_probe_closes_the_circuit() -> None:
    clock, changes = Clock(), []
    circuit = breaker(clock, changes)
    for _ in range(3):
        circuit.record_failure()
    clock.now += 31
    circuit.before_call()
    circuit.record_success()
    circuit.before_call()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_failed_probe_opens_the_circuit_for_another_cooldown() -> None:
    clock = Clock()
    circuit = breaker(clock)
    for _ in range(3):
        circuit.record_failure()
    clock.now += 31
    circuit.before_call()
    circuit.record_failure()
    clock.now += 29
    with pytest.raises(CircuitOpen) as raised:
        circuit.before_call()
    assert raised.value.retry_after_s == 1


@pytest.mark.parametrize(
    ("error", "counts_as_failure"),
    [
        (ExchangeTimeout("slow", outcome="timeout"), True),
        (ExchangeUnreachable("down", outcome="connection_error"), True),
        (ExchangeBusy("busy", outcome="soap_fault"), False),
        (ExchangeUnavailable("503", outcome="http_error"), False),
    ],
)
def test_only_timeouts_and_connection_failures_trip_the_breaker(
    error: GatewayError, counts_as_failure: bool
) -> None:
    policy = ExchangePolicy(breaker=CircuitBreaker(1, 30, clock=Clock()))
    with pytest.raises(type(error)), policy.guard():
        raise error
    assert policy.breaker is not None
    assert (policy.breaker.state is BreakerState.OPEN) is counts_as_failure


# The bulkhead


def test_the_bulkhead_refuses_calls_beyond_its_slots_at_once_and_frees_them_after() -> None:
    bulkhead = Bulkhead(2)
    with bulkhead.slot(), bulkhead.slot():
        with pytest.raises(GatewayOverloaded) as raised, bulkhead.slot():
            pass
        assert raised.value.retry_after_s == 1
        assert raised.value.outcome == "rejected"
    with bulkhead.slot():
        pass


def test_the_bulkhead_bounds_concurrent_calls_across_threads() -> None:
    bulkhead = Bulkhead(3)
    inside = threading.Barrier(4, timeout=5)
    refused = []

    def hold() -> None:
        with bulkhead.slot():
            inside.wait()
            inside.wait()

    holders = [threading.Thread(target=hold) for _ in range(3)]
    for holder in holders:
        holder.start()
    inside.wait()
    try:
        with bulkhead.slot():
            pass
    except GatewayOverloaded:
        refused.append(True)
    inside.wait()
    for holder in holders:
        holder.join()
    assert refused == [True]


# The one retry


def client(exchange: ScriptedExchange, **policy: float) -> EwsClient:
    return EwsClient(exchange, server_version="Exchange2010", policy=ExchangePolicy(**policy))


def test_a_short_back_off_is_waited_out_and_a_hang_up_retried_once() -> None:
    exchange = ScriptedExchange([reply(busy_for(50), 500), reply(DISCONNECTED)])
    result = client(exchange).disconnect_call("abc", request_id="r")
    assert result.ews_code == "NoError"
    assert len(exchange.deadlines) == 2


def test_a_busy_exchange_twice_in_a_row_is_503_after_one_retry() -> None:
    exchange = ScriptedExchange([reply(busy_for(50), 500), reply(busy_for(50), 500)])
    with pytest.raises(ExchangeBusy) as raised:
        client(exchange).get_call_information("abc", request_id="r")
    assert raised.value.retry_after_s == 1
    assert exchange.script == []


def test_placing_a_call_is_never_retried_because_it_would_dial_twice() -> None:
    exchange = ScriptedExchange([reply(busy_for(50), 500), reply(PLACED)])
    with pytest.raises(ExchangeBusy):
        client(exchange).play_on_phone("item", "+15551234567", request_id="r")
    assert len(exchange.deadlines) == 1


def test_a_long_back_off_is_not_waited_out_but_passed_to_the_caller() -> None:
    exchange = ScriptedExchange([reply(busy_for(297749), 500), reply(DISCONNECTED)])
    with pytest.raises(ExchangeBusy) as raised:
        client(exchange).disconnect_call("abc", request_id="r")
    assert raised.value.retry_after_s == 298
    assert len(exchange.deadlines) == 1


def test_a_back_off_that_would_overrun_the_deadline_is_not_waited_out() -> None:
    exchange = ScriptedExchange([reply(busy_for(1500), 500), reply(DISCONNECTED)])
    with pytest.raises(ExchangeBusy):
        client(exchange, timeout_s=1.0).disconnect_call("abc", request_id="r")
    assert len(exchange.deadlines) == 1


def test_exchange_http_503_with_a_short_retry_after_is_retried_for_a_hang_up() -> None:
    exchange = ScriptedExchange([reply(b"<html/>", 503, retry_after="1"), reply(DISCONNECTED)])
    result = client(exchange, timeout_s=5.0).disconnect_call("abc", request_id="r")
    assert result.ews_code == "NoError"


def test_both_attempts_share_one_deadline() -> None:
    exchange = ScriptedExchange([reply(busy_for(50), 500), reply(DISCONNECTED)])
    client(exchange).disconnect_call("abc", request_id="r")
    first, second = exchange.deadlines
    assert first is not None
    assert first == second


def test_a_timeout_is_not_retried() -> None:
    exchange = ScriptedExchange([ExchangeTimeout("slow", outcome="timeout"), reply(DISCONNECTED)])
    with pytest.raises(ExchangeTimeout):
        client(exchange).disconnect_call("abc", request_id="r")
    assert len(exchange.deadlines) == 1


def test_an_open_circuit_rejects_without_contacting_exchange() -> None:
    circuit = CircuitBreaker(1, 30, clock=Clock())
    circuit.record_failure()
    exchange = ScriptedExchange([reply(DISCONNECTED)])
    ews = EwsClient(exchange, server_version="Exchange2010", policy=ExchangePolicy(breaker=circuit))
    with pytest.raises(CircuitOpen):
        ews.disconnect_call("abc", request_id="r")
    assert exchange.deadlines == []


def test_the_operations_safe_to_retry_are_exactly_the_idempotent_ones() -> None:
    policy = ExchangePolicy()
    busy = ExchangeBusy("busy", back_off_s=0.1)
    far = 10**9
    assert policy.may_retry(wire.DISCONNECT_PHONE_CALL, busy, far)
    assert policy.may_retry(wire.GET_PHONE_CALL_INFORMATION, busy, far)
    assert not policy.may_retry(wire.PLAY_ON_PHONE, busy, far)
