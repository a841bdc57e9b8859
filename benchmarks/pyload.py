"""A small keep-alive HTTP/1.1 load generator, for machines without wrk.

Prints the same `LOAD_RESULT {...}` line as `load.lua`. One asyncio loop drives
every connection, so it spends a core of its own at a few thousand requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ANSWER_TIMEOUT_S = 10.0


@dataclass
class Tally:
    """What the connections saw, shared by all of them (one event loop, so no lock)."""

    latencies_us: list[int] = field(default_factory=list)
    non2xx: int = 0
    connect_errors: int = 0
    read_errors: int = 0
    timeouts: int = 0


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one whole answer; return its status and whether the server closes the connection."""
    status_line = await reader.readuntil(b"\r\n")
    status = int(status_line.split()[1])
    length, chunked, close = 0, False, False
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value
        elif name == "connection":
            close = value == "close"
    if not chunked:
        await reader.readexactly(length)
        return status, close
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        await reader.readexactly(size + 2)
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass
    return status, close


async def drive_connection(
    host: str, port: int, request: bytes, deadline: float, tally: Tally
) -> None:
    """Send REQUEST again and again on one connection until the deadline."""
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    while time.monotonic() < deadline:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                tally.connect_errors += 1
                await asyncio.sleep(0.01)
                continue
        assert reader is not None
        started = time.perf_counter()
        try:
            writer.write(request)
            status, close = await asyncio.wait_for(read_answer(reader), ANSWER_TIMEOUT_S)
        except TimeoutError:
            tally.timeouts += 1
            close = True
        except (OSError, asyncio.IncompleteReadError, ValueError):
            tally.read_errors += 1
            close = True
        else:
            tally.latencies_us.append(int((time.perf_counter() - started) * 1e6))
            tally.non2xx += not 200 <= status <= 299
        if close:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


def build_request(
    method: str, host: str, path: str, body: bytes | None, content_type: str
) -> bytes:
    """Return the raw bytes of one HTTP/1.1 request."""
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if body is not None:
        head += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")


def percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """Return the value below which FRACTION of the values fall (nearest rank)."""
    if not sorted_values:
        return 0
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


async def run(args: argparse.Namespace, body: bytes | None) -> dict[str, int]:
    """Drive the load the arguments describe and summarize it like load.lua does."""
    url = urlsplit(args.base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    request = build_request(args.method, url.netloc, args.path, body, args.content_type)
    tally = Tally()
    started = time.monotonic()
    deadline = started + args.duration
    await asyncio.gather(
        *(drive_connection(host, port, request, deadline, tally) for _ in range(args.connections))
    )
    latencies = sorted(tally.latencies_us)
    return {
        "requests": len(latencies),
        "duration_us": int((time.monotonic() - started) * 1e6),
        "non2xx": tally.non2xx,
        "connect_errors": tally.connect_errors,
        "read_errors": tally.read_errors,
        "write_errors": 0,
        "timeouts": tally.timeouts,
        "p50_us": percentile(latencies, 0.50),
        "p90_us": percentile(latencies, 0.90),
        "p99_us": percentile(latencies, 0.99),
        "max_us": latencies[-1] if latencies else 0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the load, print the result line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("base_url")
    parser.add_argument("method")
    parser.add_argument("path")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--body-file", default="-")
    parser.add_argument("--content-type", default="text/xml; charset=utf-8")
    args = parser.parse_args(argv)
    body = None if args.body_file == "-" else Path(args.body_file).read_bytes()
    summary = asyncio.run(run(args, body))
    print("LOAD_RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
