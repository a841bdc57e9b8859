"""A stand-in Redis node for tests (not a test module): a loopback server that completes
redis-py's handshake and PING as any node does, and answers every other command with one error
line, as a node that is not a usable primary does (`-READONLY`, `-LOADING`, `-MASTERDOWN`)."""

from __future__ import annotations

import socket
import threading
from typing import BinaryIO

HANDSHAKE = {b"CLIENT": b"+OK\r\n", b"HELLO": b"+OK\r\n", b"SELECT": b"+OK\r\n"}
READONLY = b"-READONLY You can't write against a read only replica.\r\n"
LOADING = b"-LOADING Redis is loading the dataset in memory\r\n"
MASTERDOWN = (
    b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.\r\n"
)


class NotPrimaryNode:
    """Answer every data command with ANSWER; count them in `refused`."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.refused: list[bytes] = []  # the names of the commands answered ANSWER
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = ("127.0.0.1", self._listener.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for connection in self._connections:
            connection.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        reader = connection.makefile("rb")
        try:
            while (command := _read_command(reader)) is not None:
                name = command[0].upper()
                if name == b"PING":
                    connection.sendall(b"+PONG\r\n")
                elif name in HANDSHAKE:
                    connection.sendall(HANDSHAKE[name])
                else:
                    self.refused.append(name)
                    connection.sendall(self.answer)
        except OSError:
            pass


def _read_command(reader: BinaryIO) -> list[bytes] | None:
    """Read one RESP command (an array of bulk strings); None once the client hung up."""
    header = reader.readline()
    if not header:
        return None
    assert header.startswith(b"*"), header
    parts = []
    for _ in range(int(header[1:])):
        length = int(reader.readline()[1:])
        parts.append(reader.read(length + 2)[:-2])
    return parts
