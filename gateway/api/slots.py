"""Stream slots: how many event streams a worker holds, and how many of them one caller.

Every stream holds a slot from before its first state is read until its socket closes.
A worker's limit bounds its file descriptors; a caller's share of it keeps one caller,
however many streams it opens, from taking the slots of every other.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from gateway.errors import CallerStreamLimitReached, ShuttingDown, StreamLimitReached

# Seconds a watcher over a stream limit is asked to wait; streams end as calls end.
STREAM_LIMIT_RETRY_S = 2


def shutting_down() -> ShuttingDown:
    """Return the refusal of a worker that drains."""
    return ShuttingDown("this instance is shutting down; connect again", retry_after_s=1)


class StreamSlots:
    """Count the streams a worker holds, in all and by caller; refuse any over a limit."""

    def __init__(self, max_streams: int, max_streams_per_caller: int) -> None:
        self.max_streams = max_streams
        self.max_streams_per_caller = max_streams_per_caller
        self._lock = threading.Lock()
        self._held = 0
        self._held_by_caller: Counter[str] = Counter()
        self._draining = False
        self._all_free = threading.Event()
        self._all_free.set()

    @property
    def draining(self) -> bool:
        return self._draining

    def reserve(self, owner: str) -> Callable[[], None]:
        """Take a slot for a stream of OWNER; return the function that frees it (once).

        Raises ShuttingDown (503) while the worker drains, CallerStreamLimitReached (429)
        when the caller holds its share and StreamLimitReached (503) when the worker is full.
        """
        with self._lock:
            if self._draining:
                raise shutting_down()
            # The caller's own limit first: one caller's streams never take every slot.
            if self._held_by_caller[owner] >= self.max_streams_per_caller:
                raise CallerStreamLimitReached(
                    f"this caller already holds its limit of {self.max_streams_per_caller} "
                    "event streams here; close one, or wait for a call to end",
                    retry_after_s=STREAM_LIMIT_RETRY_S,
                )
            if self._held >= self.max_streams:
                raise StreamLimitReached(
                    f"this worker already holds its limit of {self.max_streams} event streams",
                    retry_after_s=STREAM_LIMIT_RETRY_S,
                )
            self._held += 1
            self._held_by_caller[owner] += 1
            self._all_free.clear()
        freed = threading.Event()

        def release() -> None:
            with self._lock:
                if freed.is_set():
                    return
                freed.set()
                self._held -= 1
                self._held_by_caller[owner] -= 1
                if not self._held_by_caller[owner]:
                    del self._held_by_caller[owner]
                if self._held == 0:
                    self._all_free.set()

        return release

    def refuse_new(self) -> None:
        """Refuse every reservation from now on (the worker drains)."""
        with self._lock:
            self._draining = True

    def check_open(self) -> None:
        """Raise ShuttingDown if the worker drains."""
        with self._lock:
            if self._draining:
                raise shutting_down()

    def wait_all_free(self, timeout_s: float) -> bool:
        """Wait until every slot is free; False if some are still held after TIMEOUT_S."""
        return self._all_free.wait(timeout_s)
