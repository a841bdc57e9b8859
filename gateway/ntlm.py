"""NTLM to Exchange (EWS_AUTH=ntlm), over requests and requests-ntlm.

requests-ntlm runs the handshake; this module bounds what comes back the way
the other transport does: one deadline for the whole answer and a size cap.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import warnings
from collections.abc import Mapping

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests_ntlm import HttpNtlmAuth
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    InsecureRequestWarning,
    NewConnectionError,
    ReadTimeoutError,
    SSLError,
)

from gateway.errors import GatewayError, UpstreamBadResponse, UpstreamTimeout
from gateway.transport import (
    MAX_REPLY_BYTES,
    READ_CHUNK_BYTES,
    UpstreamReply,
    arm_timeout,
    seconds_left,
    timed_out,
    tls_failed,
    unreachable,
)


class NtlmTransport:
    """POST SOAP envelopes to Exchange with NTLM.

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
        if not self._verify:
            # `serve` warned once at start, as a JSON line; urllib3 would add a plain-text one.
            warnings.filterwarnings("ignore", category=InsecureRequestWarning)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def post(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        deadline: float | None = None,
        idempotent: bool = False,
    ) -> UpstreamReply:
        """Send one request (with the NTLM handshake when needed) and return the whole answer."""
        remaining_s = seconds_left(deadline, self._timeout_s)
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
            raise timed_out() from None
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


def _read_reply(response: urllib3.BaseHTTPResponse, deadline: float) -> UpstreamReply:
    """Read a whole urllib3 answer (capped in size and time) into an UpstreamReply."""
    sock = getattr(getattr(response, "connection", None), "sock", None)
    try:
        payload = _read_capped(response, sock, deadline)
    except HTTPError as exc:
        response.close()
        raise _translate(exc) from None
    except GatewayError:
        response.close()
        raise
    response.release_conn()
    return UpstreamReply(
        status=response.status,
        content_type=response.headers.get("Content-Type", ""),
        retry_after=response.headers.get("Retry-After"),
        location=response.headers.get("Location"),
        body=payload,
    )


def _read_capped(
    response: urllib3.BaseHTTPResponse, sock: socket.socket | None, deadline: float
) -> bytes:
    """Read the body by the deadline and within the size cap, however slowly it trickles in."""
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise UpstreamTimeout("Exchange did not finish its answer in time", outcome="timeout")
        if sock is not None:
            arm_timeout(sock, remaining_s)
        # read1 returns what has arrived; read(n) would wait for n bytes or the end.
        chunk = response.read1(READ_CHUNK_BYTES)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise UpstreamBadResponse(
                f"Exchange's answer exceeded {MAX_REPLY_BYTES} bytes", outcome="invalid_response"
            )
        chunks.append(chunk)


def _translate(exc: Exception) -> GatewayError:
    """Turn a urllib3 or requests failure into the gateway error for it."""
    # urllib3's NewConnectionError (refused, DNS) subclasses ConnectTimeoutError: test it first.
    if isinstance(exc, NewConnectionError):
        return unreachable(exc)
    if isinstance(exc, TimeoutError | ConnectTimeoutError | ReadTimeoutError):
        return timed_out()
    if isinstance(exc, ssl.SSLError | SSLError | requests.exceptions.SSLError):
        return tls_failed()
    return unreachable(exc)
