"""Load clients: one request after another on one connection, until the gateway refuses them."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPException
from typing import Any


@dataclass
class Attempt:
    """One request a load client sent, and what came back."""

    request_id: str
    sent_at: float
    answered_at: float = float("inf")
    status: int | None = None
    body: Any = None
    error: str | None = None


@dataclass
class LoadClient:
    """Sends one request after another until the gateway refuses its connection."""

    port: int
    method: str
    path: str
    keep_alive: bool
    give_up_at: float
    attempts: list[Attempt] = field(default_factory=list)
    refused: bool = False

    def run(self) -> None:
        connection: HTTPConnection | None = None
        try:
            while time.monotonic() < self.give_up_at:
                if connection is None:
                    connection = HTTPConnection("127.0.0.1", self.port, timeout=30)
                    try:
                        connection.connect()
                    except ConnectionRefusedError:
                        self.refused = True
                        return
                    except OSError as error:
                        self.attempts.append(
                            Attempt("(connecting)", time.monotonic(), error=repr(error))
                        )
                        return
                attempt = self.send(connection)
                self.attempts.append(attempt)
                if attempt.error is not None:
                    return
                if not self.keep_alive or connection.sock is None:  # closed: Connection: close
                    connection.close()
                    connection = None
        finally:
            if connection is not None:
                connection.close()

    def send(self, connection: HTTPConnection) -> Attempt:
        attempt = Attempt(request_id=os.urandom(8).hex(), sent_at=time.monotonic())
        try:
            connection.request(self.method, self.path, headers={"X-Request-ID": attempt.request_id})
            response = connection.getresponse()
            body = response.read()
            attempt.answered_at = time.monotonic()
            attempt.status = response.status
            attempt.body = json.loads(body)
        except (OSError, HTTPException, ValueError) as error:
            attempt.error = repr(error)
        return attempt
