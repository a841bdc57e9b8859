"""What the embedded store costs a request: SQLite transactions on the instance's disk.

    .venv/bin/python -m benchmarks.embeddedstore [--dir DIRECTORY]

Times, in one process, a quota charge (`SqliteStorage.incr`, against the limits library's
`MemoryStorage.incr`) and the store's work for one idempotent `POST` (`SqliteKeys.claim` then
`put`), in wall and CPU microseconds, with the store in a fresh directory under DIRECTORY
(default: the system's temporary directory, as `serve` puts it). Then two processes charge
at once, as two workers of an instance do, at a busy worker's pace and back to back, and the
report gives each one's wall time per charge (mean, p50, p99, max) while they contend for
the write lock. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from limits.storage import MemoryStorage

from gateway.guards.embeddedstore import EmbeddedStore, SqliteKeys, SqliteStorage
from gateway.guards.idempotency import KEY_TTL_S

OPERATIONS = 20_000
ROUNDS = 5
CALLERS = 100
RECORD = '{"state": "pending", "fingerprint": "%s", "startedAt": 0, "claim": "00"}' % ("f" * 64)
# A busy worker answers some 1,000 requests a second (benchmarks/RESULTS.md); back to back,
# the two keep the write lock taken all the time.
PACES = (("1,000 a second each", 1000.0), ("back to back", None))
DONE = RECORD.replace("pending", "done") + " " * 200  # an answer with its body


def per_operation_us(operation: Callable[[int], object]) -> tuple[float, float]:
    """Median over ROUNDS of (wall, CPU) microseconds per call of OPERATION."""
    walls, cpus = [], []
    for round_ in range(ROUNDS):
        wall, cpu = time.perf_counter(), time.process_time()
        for n in range(OPERATIONS):
            operation(round_ * OPERATIONS + n)
        walls.append((time.perf_counter() - wall) / OPERATIONS * 1e6)
        cpus.append((time.process_time() - cpu) / OPERATIONS * 1e6)
    return statistics.median(walls), statistics.median(cpus)


def charge_in_a_worker(
    directory: str, per_second: float | None, start: Connection, done: Connection
) -> None:
    """Charge OPERATIONS times once told to, PER_SECOND (None: back to back); send back each
    charge's wall microseconds."""
    counters = SqliteStorage(store=EmbeddedStore(directory))
    start.recv()
    timings = []
    began_at = time.perf_counter()
    for n in range(OPERATIONS):
        if per_second is not None:
            time.sleep(max(0.0, began_at + n / per_second - time.perf_counter()))
        began = time.perf_counter()
        counters.incr(f"caller-{n % CALLERS}", 60)
        timings.append((time.perf_counter() - began) * 1e6)
    done.send(timings)


def contended(directory: str, workers: int, per_second: float | None) -> list[list[float]]:
    """Charge from WORKERS processes at once; return each one's timings."""
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe(duplex=False) for _ in range(2 * workers)]
    starts, results = pipes[:workers], pipes[workers:]
    processes = [
        context.Process(
            target=charge_in_a_worker, args=(directory, per_second, start[0], result[1])
        )
        for start, result in zip(starts, results, strict=True)
    ]
    for process in processes:
        process.start()
    for start in starts:
        start[1].send("go")
    timings = [result[0].recv() for result in results]
    for process in processes:
        process.join()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to make the store's directory")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="ews-gateway-bench-", dir=args.dir)
    try:
        store = EmbeddedStore.create(directory)
        counters, keys, memory = SqliteStorage(store=store), SqliteKeys(store), MemoryStorage()

        def post(n: int) -> None:
            keys.claim(f"key-{n}", RECORD, KEY_TTL_S)
            keys.put(f"key-{n}", DONE, KEY_TTL_S)

        rows = [
            (
                "quota charge, embedded store",
                per_operation_us(lambda n: counters.incr(f"c{n % CALLERS}", 60)),
            ),
            (
                "quota charge, memory",
                per_operation_us(lambda n: memory.incr(f"c{n % CALLERS}", 60)),
            ),
            ("idempotent POST's claim and answer, embedded store", per_operation_us(post)),
        ]
        print(
            f"Store in {Path(directory).parent}, {OPERATIONS:,} a round, median of {ROUNDS} rounds"
        )
        print()
        print("| operation | wall µs | CPU µs |")
        print("|---|---|---|")
        for name, (wall, cpu) in rows:
            print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
        print()
        print("| two workers charging at once | wall µs: mean | p50 | p99 | max |")
        print("|---|---|---|---|---|")
        for pace, per_second in PACES:
            for n, timings in enumerate(contended(directory, 2, per_second)):
                cuts = statistics.quantiles(timings, n=100)
                print(
                    f"| {pace}, worker {n + 1} | {statistics.fmean(timings):.1f}"
                    f" | {cuts[49]:.1f} | {cuts[98]:.1f} | {max(timings):.0f} |"
                )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
