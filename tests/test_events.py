"""What an event of a call's stream says: ids that only move forward, and which states are news."""

from __future__ import annotations

import pytest

from gateway import wire
from gateway.api import events
from gateway.api.events import Position, Progress
from gateway.errors import ExchangeBusy, GatewayError
from gateway.exchange.client import CallInformation


def info(state: str, sip: int | None = None) -> CallInformation:
    return CallInformation(
        state=state,
        connection_failure_cause="None",
        sip_response_code=sip,
        sip_response_text=None,
        ews_code="NoError",
    )


def test_states_rank_in_the_order_a_call_lives_them() -> None:
    ranks = [events.snapshot(info(state)).position.rank for state in wire.PHONE_CALL_STATES[:5]]

    assert wire.PHONE_CALL_STATES[:5] == (
        "Idle",
        "Connecting",
        "Alerted",
        "Connected",
        "Disconnected",
    )
    assert ranks == [0, 1, 2, 3, 4]
    assert events.snapshot(info("Disconnected")).ended
    assert not any(events.snapshot(info(state)).ended for state in wire.PHONE_CALL_STATES[5:])


def test_a_state_exchange_may_add_later_goes_on_and_never_ends_the_call() -> None:
    unknown = events.snapshot(info("OnHold"))

    assert unknown.position.rank == events.RANK_BY_STATE["Connected"]
    assert not unknown.ended


def test_an_event_id_is_the_rank_and_the_fingerprint_and_is_read_back() -> None:
    connected = events.snapshot(info("Connected"))
    event = events.state_event("call-1", connected).decode()

    event_id = event.split("\n", 1)[0].removeprefix("id: ")
    assert event_id == f"3.{connected.fingerprint}"
    assert events.parse_last_event_id(event_id) == connected.position
    assert events.parse_last_event_id(f" {event_id} ") == connected.position
    assert events.parse_last_event_id(None) is None
    assert events.parse_last_event_id("") is None


@pytest.mark.parametrize(
    "header",
    ["3-0123456789ab", "5.0123456789ab", "3.0123456789AB", "3.0123", "3.<script>", "abc"],
    ids=["the-former-format", "no-such-rank", "upper-case", "short", "markup", "junk"],
)
def test_a_last_event_id_this_gateway_never_sent_is_400(header: str) -> None:
    with pytest.raises(GatewayError) as refused:
        events.parse_last_event_id(header)

    assert refused.value.status == 400
    assert "Last-Event-ID" in refused.value.detail


def test_only_a_final_position_says_the_call_ended() -> None:
    assert Position(4, "0" * 12).final
    assert not Position(3, "0" * 12).final


def test_a_fingerprint_follows_the_call_not_its_warning() -> None:
    plain = events.snapshot(info("Alerted"))
    warned = events.snapshot(
        CallInformation(
            state="Alerted",
            connection_failure_cause="None",
            sip_response_code=None,
            sip_response_text=None,
            ews_code="NoError",
            warning="slow",
        ),
    )

    assert plain.position == warned.position
    assert plain.fingerprint != events.snapshot(info("Connected")).fingerprint


def test_a_later_rank_is_news_an_earlier_one_never_and_the_same_only_when_read_after() -> None:
    seen = events.snapshot(info("Connected")).position
    transferring = events.snapshot(info("Transferring"))

    assert events.is_news(events.snapshot(info("Disconnected")), seen, read_after_seen=False)
    assert not events.is_news(events.snapshot(info("Connecting")), seen, read_after_seen=True)
    assert not events.is_news(transferring, seen, read_after_seen=False)
    assert events.is_news(transferring, seen, read_after_seen=True)
    assert not events.is_news(events.snapshot(info("Connected")), seen, read_after_seen=True)
    assert events.is_news(events.snapshot(info("Idle")), None, read_after_seen=False)


def test_progress_sends_each_state_once_and_moves_on_from_what_it_sent() -> None:
    progress = Progress(None, asked_at=10.0)
    connected, transferring = (
        events.snapshot(info("Connected")),
        events.snapshot(info("Transferring")),
    )

    assert progress.offer(connected, started_at=10.1, answered_at=10.2)
    assert not progress.offer(connected, started_at=11.2, answered_at=11.3)
    # The next poll of the call started after the last answer: a same-rank change is news.
    assert progress.offer(transferring, started_at=12.3, answered_at=12.4)
    assert progress.offer(connected, started_at=13.4, answered_at=13.5)
    assert progress.seen == connected.position


def test_a_resumed_stream_starts_from_an_answer_fresh_enough_and_not_behind_the_watcher() -> None:
    seen = events.snapshot(info("Alerted")).position
    progress = Progress(seen, asked_at=100.0)
    connecting, connected = events.snapshot(info("Connecting")), events.snapshot(info("Connected"))

    assert progress.can_start_from(connected, 99.5, 99.6, max_age_s=1.0)
    assert not progress.can_start_from(connecting, 99.5, 99.6, max_age_s=1.0), "behind"
    assert not progress.can_start_from(connected, 98.0, 98.5, max_age_s=1.0), "too old"
    # Read after the watcher asked, an answer is the call now, whatever it says.
    assert progress.can_start_from(connecting, 100.0, 100.2, max_age_s=1.0)
    assert progress.can_start_from(None, 100.1, 100.2, max_age_s=1.0)
    assert not progress.can_start_from(None, 99.9, 100.2, max_age_s=1.0), "an earlier failure"


def test_a_problem_is_the_event_problem_never_error() -> None:
    busy = ExchangeBusy("Exchange answered ErrorServerBusy", retry_after_s=2)

    framed = events.problem_event(busy, "req-1").decode()

    assert framed.startswith("retry: 2000\nevent: problem\ndata: {")
    assert "event: error" not in framed
