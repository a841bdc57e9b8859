"""Polls of watched calls, and streams that resume on any instance.

Pollers run here on a fake clock, with polls queued on an executor the test runs by
hand, so every interleaving of polls, answers, watchers and instances can be played.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.api import events
from gateway.api.events import Position, Progress, Snapshot
from gateway.api.pollers import Pollers, PollOutcome
from gateway.exchange.client import CallInformation

KEY = (None, "call-1")
INTERVAL_S = 1.0


class Clock:
    """A clock that moves only when told, and a microsecond at each reading: no two
    readings are ever equal, as on a real monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1e-6
        return self.now


class ManualExecutor(Executor):
    """Queues what it is given; the test runs it, in order, when it chooses."""

    def __init__(self) -> None:
        self.queued: list[tuple[Future[None], Callable[..., None], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[None] = Future()
        self.queued.append((future, fn, args))
        return future

    def run_next(self) -> bool:
        """Run the oldest queued task that was not cancelled; False if none was left."""
        while self.queued:
            future, fn, args = self.queued.pop(0)
            if future.set_running_or_notify_cancel():
                fn(*args)
                future.set_result(None)
                return True
        return False


@dataclass
class Call:
    """Exchange's view of one call: a timeline of states, and where it stands."""

    timeline: list[CallInformation]
    now: int = 0
    reads: int = 0

    def get_call_information(
        self, call_id: str, *, request_id: str, mailbox: str | None = None
    ) -> CallInformation:
        self.reads += 1
        return self.timeline[self.now]

    def advance(self) -> None:
        self.now = min(self.now + 1, len(self.timeline) - 1)

    def disconnect_call(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def play_on_phone(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


@dataclass
class Instance:
    """One gateway worker: its pollers, their poll threads, answers not yet settled."""

    pollers: Pollers
    executor: ManualExecutor
    answers: list[PollOutcome] = field(default_factory=list)
    polls: list[PollOutcome] = field(default_factory=list)  # every answer, for the bound


def instance(call: Call, clock: Clock) -> Instance:
    executor = ManualExecutor()
    answers: list[PollOutcome] = []
    polls: list[PollOutcome] = []

    def deliver(outcome: PollOutcome) -> None:
        answers.append(outcome)
        polls.append(outcome)

    pollers = Pollers(
        call,  # type: ignore[arg-type]
        interval_s=INTERVAL_S,
        threads=1,
        deliver=deliver,
        clock=clock,
        executor=executor,
    )
    return Instance(pollers, executor, answers, polls)


def info(state: str, sip: int | None = None) -> CallInformation:
    return CallInformation(
        state=state,
        connection_failure_cause="None",
        sip_response_code=sip,
        sip_response_text=None,
        ews_code="NoError",
    )


# Pollers: what is asked of Exchange.


def test_a_watcher_that_leaves_before_its_poll_set_off_cancels_it() -> None:
    clock, call = Clock(), Call([info("Connected")])
    worker = instance(call, clock)
    worker.pollers.watch(KEY, "w1", "req-1")
    worker.pollers.start_due(clock())

    worker.pollers.unwatch(KEY, "w1")

    assert not worker.executor.run_next(), "the queued poll was dropped"
    assert call.reads == 0
    assert len(worker.pollers) == 0


def test_a_call_nobody_watches_is_never_polled() -> None:
    clock, call = Clock(), Call([info("Connected")])
    worker = instance(call, clock)
    worker.pollers.watch(KEY, "w1", "req-1")
    worker.pollers.start_due(clock())
    worker.executor.run_next()
    worker.pollers.settle(worker.answers.pop())
    worker.pollers.unwatch(KEY, "w1")

    for _ in range(10):
        clock.now += INTERVAL_S
        worker.pollers.start_due(clock())
        worker.executor.run_next()

    assert call.reads == 1


def test_a_poll_under_way_when_the_last_watcher_leaves_serves_the_next_one() -> None:
    clock, call = Clock(), Call([info("Connected")])
    worker = instance(call, clock)
    worker.pollers.watch(KEY, "w1", "req-1")
    worker.pollers.start_due(clock())
    future, poll, args = worker.executor.queued.pop(0)
    future.set_running_or_notify_cancel()  # the poll has set off
    worker.pollers.unwatch(KEY, "w1")
    poll(*args)
    worker.pollers.settle(worker.answers.pop())
    taken: list[PollOutcome] = []

    worker.pollers.wait(KEY, "req-2", lambda outcome: taken.append(outcome) is None)

    assert [outcome.snapshot.body["state"] for outcome in taken if outcome.snapshot] == [
        "Connected"
    ]
    assert call.reads == 1


def test_watchers_that_come_and_go_ask_exchange_once_an_interval() -> None:
    clock, call = Clock(), Call([info("Connected")])
    worker = instance(call, clock)
    started = clock.now
    for n in range(4000):  # 5 s of a client opening and dropping streams of one call
        clock.now += 5 / 4000
        taken: list[PollOutcome] = []
        waiter = lambda outcome, taken=taken: taken.append(outcome) is None  # noqa: E731
        worker.pollers.wait(KEY, f"req-{n}", waiter)
        worker.pollers.start_due(clock())
        worker.executor.run_next()
        for answer in worker.answers:
            worker.pollers.settle(answer)
        worker.answers.clear()
        worker.pollers.forget(KEY, waiter)
        worker.pollers.watch(KEY, f"w{n}", f"req-{n}")
        worker.pollers.unwatch(KEY, f"w{n}")

    assert call.reads <= (clock.now - started) / INTERVAL_S + 1
    assert_one_poll_an_interval(worker)


def assert_one_poll_an_interval(worker: Instance) -> None:
    for earlier, later in itertools.pairwise(worker.polls):
        assert later.started_at >= earlier.answered_at + INTERVAL_S, (earlier, later)


# Resuming on any instance: the property.


@dataclass(eq=False)
class Watcher:
    """A browser tab: what it was sent, and its connection to one instance, if any."""

    received: list[Snapshot] = field(default_factory=list)
    last_id: Position | None = None
    at: Instance | None = None
    progress: Progress | None = None
    waiter: Callable[[PollOutcome], bool] | None = None
    first: PollOutcome | None = None  # taken by the waiter, not yet opened on the pump
    watching: bool = False

    @property
    def saw_the_end(self) -> bool:
        return self.last_id is not None and self.last_id.final


def connect(watcher: Watcher, worker: Instance, clock: Clock) -> None:
    """GET .../events with Last-Event-ID, as gateway.api.streams answers it."""
    drop(watcher)
    if watcher.saw_the_end:
        return  # 204 No Content
    progress = Progress(watcher.last_id, clock())

    def waiter(outcome: PollOutcome) -> bool:
        if not progress.can_start_from(
            outcome.snapshot, outcome.started_at, outcome.answered_at, INTERVAL_S
        ):
            return False
        watcher.first = outcome
        return True

    watcher.at, watcher.progress, watcher.waiter = worker, progress, waiter
    worker.pollers.wait(KEY, "req", waiter)


def open_stream(watcher: Watcher) -> None:
    """The pump takes the stream over: the first state, then what was polled meanwhile."""
    if watcher.first is None or watcher.watching or watcher.at is None:
        return
    first, watcher.watching = watcher.first, True
    poller = watcher.at.pollers.watch(KEY, watcher, "req")
    offer(watcher, first)
    latest = poller.last
    if latest is not None and latest.answered_at > first.answered_at and watcher.watching:
        offer(watcher, latest)


def offer(watcher: Watcher, outcome: PollOutcome) -> None:
    assert watcher.progress is not None
    state = outcome.snapshot
    assert state is not None  # Exchange never fails here
    if watcher.progress.offer(state, outcome.started_at, outcome.answered_at):
        watcher.received.append(state)
        watcher.last_id = state.position
    if state.ended:
        drop(watcher)


def drop(watcher: Watcher) -> None:
    if watcher.at is not None:
        if watcher.watching:
            watcher.at.pollers.unwatch(KEY, watcher)
        elif watcher.waiter is not None:
            watcher.at.pollers.forget(KEY, watcher.waiter)
    watcher.at, watcher.waiter, watcher.first, watcher.watching = None, None, None, False


def settle(worker: Instance) -> None:
    """The pump takes one answer: waiters first, then every watcher of the call."""
    if not worker.answers:
        return
    outcome = worker.answers.pop(0)
    poller = worker.pollers.settle(outcome)
    if poller is not None:
        for watcher in list(poller.watchers):
            offer(watcher, outcome)


def timelines() -> st.SearchStrategy[list[CallInformation]]:
    """A call's states: ranks never go back, same-rank changes allowed, then the end."""
    ongoing = [state for state in events.RANK_BY_STATE if state != "Disconnected"]
    drawn = st.lists(st.sampled_from(ongoing), max_size=4)
    return drawn.map(
        lambda states: (
            [
                # A SIP code of its own makes every point of the timeline a distinct state.
                info(state, sip=100 + n)
                for n, state in enumerate([*sorted(states, key=events.RANK_BY_STATE.__getitem__)])
            ]
            + [info("Disconnected")]
        )
    )


WORKERS = st.integers(0, 1)
WHO = st.integers(0, 1)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("advance")),
        st.tuples(st.just("tick"), st.sampled_from([0.2, 0.6, 1.0, 2.5])),
        st.tuples(st.just("cycle"), WORKERS),
        st.tuples(st.just("poll"), WORKERS),
        st.tuples(st.just("settle"), WORKERS),
        st.tuples(st.just("connect"), WHO, WORKERS),
        st.tuples(st.just("drop"), WHO),
    ),
    min_size=10,
    max_size=30,
)


@settings(max_examples=1000, deadline=None)
@given(timeline=timelines(), steps=STEPS)
# The watcher saw Connected at one instance; the other's last answer is Connecting.
@example(
    timeline=[info("Connecting"), info("Connected"), info("Disconnected")],
    steps=[("cycle", 1), ("advance",), ("cycle", 0), ("connect", 0, 1)],
)
# The watcher saw the transfer at one instance; the other read the call before it.
@example(
    timeline=[info("Connected"), info("Transferring"), info("Disconnected")],
    steps=[("cycle", 1), ("advance",), ("cycle", 0), ("connect", 0, 1)],
)
def test_any_interleaving_gives_every_watcher_the_calls_states_in_order_each_once(
    timeline: list[CallInformation], steps: list[tuple[Any, ...]]
) -> None:
    clock, call = Clock(), Call(timeline)
    workers = [instance(call, clock) for _ in range(2)]
    watchers = [Watcher() for _ in range(2)]
    for watcher, worker in zip(watchers, workers, strict=True):
        connect(watcher, worker, clock)
    for step in steps:
        play(step, call, clock, workers, watchers)
    finish(call, clock, workers, watchers)

    order = {events.snapshot(state).position: n for n, state in enumerate(timeline)}
    for watcher in watchers:
        seen = [order[state.position] for state in watcher.received]
        assert seen == sorted(set(seen)), "in order, each once"
        assert watcher.saw_the_end, "the end always arrives"
    for worker in workers:
        assert_one_poll_an_interval(worker)


def play(
    step: tuple[Any, ...],
    call: Call,
    clock: Clock,
    workers: list[Instance],
    watchers: list[Watcher],
) -> None:
    match step:
        case ("advance",):
            call.advance()
        case ("tick", seconds):
            clock.now += seconds
        case ("cycle", n):  # a poll falls due, is answered, and the pump hands it out
            workers[n].pollers.start_due(clock())
            workers[n].executor.run_next()
            while workers[n].answers:
                settle(workers[n])
        case ("poll", n):  # a poll falls due and Exchange answers; the pump has not seen it
            workers[n].pollers.start_due(clock())
            workers[n].executor.run_next()
        case ("settle", n):
            settle(workers[n])
        case ("connect", who, n):
            connect(watchers[who], workers[n], clock)
            open_stream(watchers[who])  # when its first state was at hand
        case ("drop", who):
            drop(watchers[who])
    # A request thread that got its first state hands its stream to the pump (maybe later).
    for watcher in watchers:
        if step[0] in ("cycle", "settle", "tick"):
            open_stream(watcher)


def finish(call: Call, clock: Clock, workers: list[Instance], watchers: list[Watcher]) -> None:
    """Let the call end and every watcher follow it to the end, wherever it is."""
    while call.now < len(call.timeline) - 1:
        call.advance()
    for _ in range(20):
        for watcher in watchers:
            if watcher.at is None:
                connect(watcher, workers[0], clock)
            open_stream(watcher)
        if all(watcher.saw_the_end for watcher in watchers):
            return
        clock.now += INTERVAL_S
        for worker in workers:
            worker.pollers.start_due(clock())
            while worker.executor.run_next():
                pass
            while worker.answers:
                settle(worker)
