"""HTTP to Exchange: the only module that opens connections upstream.

One urllib3 connection pool per process, shared by all threads. Redirects are
never followed (Exchange redirects to an HTML error page), nothing is retried
here, and answers are read with a size cap so a hostile body cannot exhaust
memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests_ntlm import HttpNtlmAuth
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
    SSLError,
)

from gateway.errors import GatewayError, UpstreamBadResponse, UpstreamTimeout, UpstreamUnreachable

# EWS answers for the phone-call operations are a few kilobytes; anything far
# larger is not a real answer.
MAX_REPLY_BYTES = 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class UpstreamReply:
    """An HTTP answer from Exchange, fully read."""

    status: int
    content_type: str
    retry_after: str | None
    location: str | None
    body: bytes


class ExchangeTransport:
    """POST SOAP envelopes to one Exchange endpoint over a pooled connection."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        verify_tls: bool = True,
        ca_bundle: str | None = None,
        authorization: str | None = None,
        pool_size: int = 16,
    ) -> None:
        parts = urlsplit(url)
        self._path = parts.path + (f"?{parts.query}" if parts.query else "") or "/"
        self._timeout_s = timeout_s
        self._authorization = authorization
        tls_options: dict[str, object] = {}
        if parts.scheme == "https":
            tls_options = {"cert_reqs": "CERT_REQUIRED" if verify_tls else "CERT_NONE"}
            if ca_bundle:
                tls_options["ca_certs"] = ca_bundle
        # block=False: a burst beyond pool_size opens extra connections instead of queueing.
        self._pool = urllib3.connection_from_url(
            url, maxsize=pool_size, block=False, retries=False, **tls_options
        )

    def post(
        self, body: bytes, headers: Mapping[str, str], *, deadline: float | None = None
    ) -> UpstreamReply:
        """Send one request and return the whole answer by the deadline, or raise a GatewayError."""
        remaining_s = _remaining(deadline, self._timeout_s)
        deadline = time.monotonic() + remaining_s
        all_headers = {**headers, "User-Agent": "ews-call-gateway"}
        if self._authorization:
            all_headers["Authorization"] = self._authorization
        try:
            response = self._pool.urlopen(
                "POST",
                self._path,
                body=body,
                headers=all_headers,
                redirect=False,
                retries=False,
                preload_content=False,
                timeout=urllib3.Timeout(connect=remaining_s, read=remaining_s),
            )
        except MaxRetryError as exc:
            raise _translate(exc.reason or exc) from None
        except HTTPError as exc:
            raise _translate(exc) from None
        return _read_reply(response, deadline)

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.close()


class NtlmTransport:
    """POST SOAP envelopes to Exchange with NTLM (EWS_AUTH=ntlm).

    NTLM authenticates a connection, not a request. Each thread therefore gets
    its own session holding a single connection, so a handshake can never be
    split across connections and no thread can use another's authenticated one.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        username: str,
        password: str,
        verify_tls: bool = True,
        ca_bundle: str | None = None,
    ) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._auth = HttpNtlmAuth(username, password)
        self._verify: bool | str = ca_bundle or verify_tls
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def post(
        self, body: bytes, headers: Mapping[str, str], *, deadline: float | None = None
    ) -> UpstreamReply:
        """Send one request (with the NTLM handshake when needed) and return the whole answer."""
        remaining_s = _remaining(deadline, self._timeout_s)
        deadline = time.monotonic() + remaining_s
        try:
            response = self._session().post(
                self._url,
                data=body,
                headers={**headers, "User-Agent": "ews-call-gateway"},
                timeout=remaining_s,
                allow_redirects=False,
                stream=True,
            )
        except requests.Timeout:
            raise UpstreamTimeout("Exchange did not answer in time", outcome="timeout") from None
        except requests.RequestException as exc:
            raise _translate(exc) from None
        return _read_reply(response.raw, deadline)

    def close(self) -> None:
        """Close every thread's session."""
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.auth = self._auth
            session.verify = self._verify
            session.trust_env = False  # no proxies or .netrc credentials from the environment
            single_connection = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
            session.mount("http://", single_connection)
            session.mount("https://", single_connection)
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session


def _remaining(deadline: float | None, timeout_s: float) -> float:
    """Seconds left for this call: the request's deadline, never more than the timeout."""
    if deadline is None:
        return timeout_s
    remaining_s = min(timeout_s, deadline - time.monotonic())
    if remaining_s <= 0:
        raise UpstreamTimeout("no time was left to ask Exchange", outcome="timeout")
    return remaining_s


def _read_reply(response: urllib3.BaseHTTPResponse, deadline: float) -> UpstreamReply:
    """Read the whole answer (capped in size and time) into an UpstreamReply."""
    try:
        payload = _read_capped(response, deadline)
    except HTTPError as exc:
        response.close()
        raise _translate(exc) from None
    return UpstreamReply(
        status=response.status,
        content_type=response.headers.get("Content-Type", ""),
        retry_after=response.headers.get("Retry-After"),
        location=response.headers.get("Location"),
        body=payload,
    )


def _read_capped(response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
    """Read the body by the deadline and within the size cap, however slowly it trickles in."""
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            response.close()
            raise UpstreamTimeout("Exchange did not finish its answer in time", outcome="timeout")
        _wait_at_most(response, remaining_s)
        # read1 returns what has arrived; read(n) would wait for n bytes or the end.
        chunk = response.read1(READ_CHUNK_BYTES)
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            response.close()
            raise UpstreamBadResponse(
                f"Exchange's answer exceeded {MAX_REPLY_BYTES} bytes", outcome="invalid_response"
            )
        chunks.append(chunk)
    response.release_conn()
    return b"".join(chunks)


def _wait_at_most(response: urllib3.BaseHTTPResponse, seconds: float) -> None:
    """Bound the next socket read by the time left before the deadline."""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _translate(exc: BaseException) -> GatewayError:
    """Turn a urllib3 or requests failure into the gateway error the contract maps it to."""
    # NewConnectionError (refused, DNS) subclasses ConnectTimeoutError: test it first.
    if isinstance(exc, NewConnectionError):
        return UpstreamUnreachable(
            f"Exchange could not be reached ({type(exc).__name__})", outcome="connection_error"
        )
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        return UpstreamTimeout("Exchange did not answer in time", outcome="timeout")
    if isinstance(exc, SSLError | requests.exceptions.SSLError):
        return UpstreamUnreachable(
            "The TLS connection to Exchange failed", outcome="connection_error"
        )
    return UpstreamUnreachable(
        f"Exchange could not be reached ({type(exc).__name__})", outcome="connection_error"
    )
