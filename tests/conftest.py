"""Fixtures shared by every test: sockets are off unless a test says it needs them."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypothesis import settings

# Helper modules hold assertions too: rewritten as a test module's are, a failure shows values.
pytest.register_assert_rewrite(
    "tests.ews_schema",
    "tests.fake_ews",
    "tests.problems",
    "tests.integration.processes",
    "tests.integration.tinyproxy",
    "tests.integration.witness",
)


# Property tests assert behaviour, never timings: on a loaded machine one example can take
# longer than hypothesis's default 200 ms deadline without anything being wrong.
settings.register_profile("gateway", deadline=None)
settings.load_profile("gateway")


class NetworkBlocked(RuntimeError):
    """Raised when a unit test tries to open a socket."""


@pytest.fixture(autouse=True)
def _block_network(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forbid sockets in unit tests; tests marked `network` may use loopback."""
    if request.node.get_closest_marker("network") is None:

        def refuse(*_args: Any, **_kwargs: Any) -> None:
            raise NetworkBlocked("unit tests must not open sockets; mark the test `network`")

        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket.socket, "connect_ex", refuse)
        monkeypatch.setattr(socket.socket, "bind", refuse)
