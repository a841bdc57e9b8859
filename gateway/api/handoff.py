"""Taking a connection over from gunicorn once the response head is known.

Under any other WSGI server (Flask's test client, `flask run`) the stream is
relayed instead: the pump writes into one end of a socket pair and the request
thread copies the other end into the response body, holding that thread for
as long as the stream lasts.

The event stream route answers like any other route (hooks add the request id,
CORS headers, the metric and the log line), but its response, instead of
giving gunicorn a body to write, renders the head itself and gives the socket
away: gunicorn then neither writes nor closes the connection (its gthread
worker treats StopIteration from the app as "nothing more to do"; the
gateway's worker, gateway.serving.server, also leaves the socket open).
"""

from __future__ import annotations

import socket
import weakref
from collections.abc import Callable, Iterable, Iterator
from email.utils import formatdate
from typing import Any

from flask import Response

# Takes the rendered head, and the function that frees the stream's reservation.
Adopt = Callable[[bytes, Callable[[], None]], None]
# no-store: no cache keeps a stream. no-transform: no proxy compresses it, which would hold
# events back in its compressor (RFC 9111 5.2.2.6; Express's `compression` honours it).
# X-Accel-Buffering: nginx passes each event on.
STREAM_HEADERS = {"Cache-Control": "no-store, no-transform", "X-Accel-Buffering": "no"}


class HandedOff(StopIteration):
    """The pump owns the connection now: gunicorn must neither answer nor close it."""


class HandOffResponse(Response):
    """A text/event-stream response whose body the event pump writes."""

    def __init__(self, adopt: Adopt, release: Callable[[], None], *, chunked: bool) -> None:
        super().__init__(
            status=200,
            mimetype="text/event-stream",
            headers=STREAM_HEADERS,
        )
        self._adopt = adopt
        self._chunked = chunked
        # Released with the response if it never reaches __call__ (e.g. a failing hook).
        self._finalizer = weakref.finalize(self, release)

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        """Hand the response head and the socket over; gunicorn sends nothing itself."""
        detached = self._finalizer.detach()
        if detached is None:  # already released: cannot happen while the response is alive
            raise RuntimeError("event stream reservation lost")
        headers = self.get_wsgi_headers(environ).to_wsgi_list()
        self._adopt(response_head(self.status, headers, self._chunked), detached[1])
        raise HandedOff


def relayed_response(adopt: Callable[[socket.socket], None]) -> Response:
    """Give the pump one end of a socket pair; the response body is what arrives at the other."""
    pump_end, relay_end = socket.socketpair()
    adopt(pump_end)

    def relay() -> Iterator[bytes]:
        try:
            while data := relay_end.recv(65536):
                yield data
        finally:  # also when the server stops early (the client left): the pump sees it end
            relay_end.close()

    return Response(relay(), 200, mimetype="text/event-stream", headers=STREAM_HEADERS)


def response_head(status: str, headers: list[tuple[str, str]], chunked: bool) -> bytes:
    """Render a streaming response's head; the body runs until the connection closes."""
    version = "HTTP/1.1" if chunked else "HTTP/1.0"
    lines = [f"{version} {status}", f"Date: {formatdate(usegmt=True)}", "Connection: close"]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines += [f"{name}: {value}" for name, value in headers if name.lower() != "content-length"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
