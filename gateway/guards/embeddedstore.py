"""The embedded store: one SQLite file that every worker of one `serve` shares.

Without GATEWAY_REDIS_URL, `serve` makes a private directory for the instance before its
workers fork and creates the store in it (`EmbeddedStore.create`); each worker keeps its
idempotency keys (`SqliteKeys`) and quota counts (`SqliteStorage`, a storage of the limits
library) there, so the workers of one instance agree as replicas sharing Redis do. The file
outlives a recycled worker; `serve` removes it with the directory when the instance stops, so
a restart forgets keys and counts, as a Redis restart without persistence does.

SQLite in WAL mode: a reader never waits for the writer; every write is one short transaction
that takes the write lock before it reads (`BEGIN IMMEDIATE`), so a claim or a count cannot
interleave with another worker's; a worker waits at most BUSY_TIMEOUT_S for the lock. Nothing
is synced to disk (`synchronous=OFF`): what is committed survives a worker's crash (it is in
the operating system's cache) and nothing here has to survive the machine's, which ends the
instance anyway. An increment, with the file on local disk, costs 16 µs of CPU back to back
and some 50 µs of wall time in a process that slept before it (a cold cache), against some
1,000 µs of CPU for a whole request and 86 for a Redis round trip (benchmarks/RESULTS.md,
"Measurements behind design choices"): quotas are counted a unit at a time, exactly, without
the leases Redis needs.

Each process opens the file once, on first use (a worker, after the fork), and its threads
take turns on that connection: a transaction lasts microseconds, and the turns keep waiting
for the lock to one thread per process. Expired rows are deleted by a process's first write
after PURGE_EVERY_S.

Errors (a full disk, the directory removed underneath): idempotency keys fail CLOSED with
`503` and a warning at most every WARN_EVERY_S per process; quotas fail OPEN as with Redis
(gateway.guards.quotas logs them).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from limits.errors import ConfigurationError
from limits.storage import Storage

from gateway.errors import ConfigError, SharedStateUnavailable

LOG = logging.getLogger("gateway")
FILE_NAME = "state.sqlite3"
# Far above a transaction here (microseconds) and a checkpoint of the log (milliseconds).
BUSY_TIMEOUT_S = 1.0
PURGE_EVERY_S = 60.0
WARN_EVERY_S = 10.0
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS idempotency_keys"
    " (key TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS idempotency_keys_expiry ON idempotency_keys (expires_at)",
    "CREATE TABLE IF NOT EXISTS quota_counters"
    " (key TEXT PRIMARY KEY, count INTEGER NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS quota_counters_expiry ON quota_counters (expires_at)",
)
PURGE = (
    "DELETE FROM idempotency_keys WHERE expires_at <= ?",
    "DELETE FROM quota_counters WHERE expires_at <= ?",
)


class EmbeddedStore:
    """The store's file in DIRECTORY, opened once per process and shared by its threads."""

    def __init__(self, directory: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(directory) / FILE_NAME
        # Wall-clock seconds: expiry times are compared across processes.
        self.clock = clock
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._next_purge = 0.0

    @classmethod
    def create(cls, directory: str | Path) -> EmbeddedStore:
        """Create the store in DIRECTORY, once, before the processes that share it start.

        Raises ConfigError where SQLite cannot keep it (WAL needs a local filesystem).
        """
        path = Path(directory) / FILE_NAME
        try:
            with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
                # WAL stays with the file, for every later connection.
                if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                    raise sqlite3.OperationalError("the filesystem does not support WAL")
                for statement in SCHEMA:
                    db.execute(statement)
        except sqlite3.Error as error:
            raise ConfigError(
                f"cannot create the embedded store in {directory}: {error} (it needs a local "
                "filesystem)"
            ) from None
        return cls(directory)

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """Lend this process's connection for reads (each statement sees committed rows)."""
        with self._lock:
            yield self._connect()

    @contextlib.contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """Lend this process's connection inside a write transaction, committed on leaving."""
        with self._lock:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                self._purge_if_due(db)
                yield db
                db.execute("COMMIT")
            except BaseException:
                self._abandon(db)
                raise

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            # mode=rw: a missing file is an error, never a new empty store no other worker sees.
            self._connection = sqlite3.connect(
                f"{self.path.absolute().as_uri()}?mode=rw",
                uri=True,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,  # threads take turns under self._lock
            )
            self._connection.execute("PRAGMA synchronous=OFF")
        return self._connection

    def _abandon(self, db: sqlite3.Connection) -> None:
        """Roll back a failed transaction; a connection that cannot is replaced on next use."""
        try:
            if db.in_transaction:
                db.rollback()
        except sqlite3.Error:
            self._connection = None
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _purge_if_due(self, db: sqlite3.Connection) -> None:
        now = self.clock()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY_S
        for statement in PURGE:
            db.execute(statement, (now,))


class SqliteKeys:
    """Idempotency keys in the embedded store: a claim reads and writes in one transaction,
    so one request of the instance dials."""

    def __init__(self, store: EmbeddedStore) -> None:
        self._store = store
        self._warned_at = float("-inf")

    def claim(self, key: str, record: str, ttl_s: int) -> str | None:
        with self._failing_closed(), self._store.writing() as db:
            now = self._store.clock()
            row = db.execute(
                "SELECT record FROM idempotency_keys WHERE key = ? AND expires_at > ?", (key, now)
            ).fetchone()
            if row is not None:
                return str(row[0])
            db.execute(
                "INSERT OR REPLACE INTO idempotency_keys VALUES (?, ?, ?)",
                (key, record, now + ttl_s),
            )
            return None

    def get(self, key: str) -> str | None:
        with self._failing_closed(), self._store.reading() as db:
            row = db.execute(
                "SELECT record FROM idempotency_keys WHERE key = ? AND expires_at > ?",
                (key, self._store.clock()),
            ).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, record: str, ttl_s: int) -> None:
        with self._failing_closed(), self._store.writing() as db:
            db.execute(
                "INSERT OR REPLACE INTO idempotency_keys VALUES (?, ?, ?)",
                (key, record, self._store.clock() + ttl_s),
            )

    def release(self, key: str) -> None:
        with self._failing_closed(), self._store.writing() as db:
            db.execute("DELETE FROM idempotency_keys WHERE key = ?", (key,))

    def release_own(self, key: str, record: str) -> None:
        with self._failing_closed(), self._store.writing() as db:
            db.execute("DELETE FROM idempotency_keys WHERE key = ? AND record = ?", (key, record))

    @contextlib.contextmanager
    def _failing_closed(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as error:
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                LOG.warning(
                    "the embedded store failed; requests with an Idempotency-Key get 503",
                    extra={"error": f"{type(error).__name__}: {error}"},
                )
            raise SharedStateUnavailable(
                "idempotency keys cannot be checked right now; retry shortly",
                retry_after_s=1,
            ) from None


class SqliteStorage(Storage):
    """Fixed-window counters of the limits library in the embedded store.

    Built on a store (`SqliteStorage(store=...)`) or from a URI naming the store's directory:
    `ews-gateway+sqlite:///run/ews-gateway/state`.
    """

    STORAGE_SCHEME = ["ews-gateway+sqlite"]  # noqa: RUF012 - the limits registry's own attribute

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        *,
        store: EmbeddedStore | None = None,
        **options: float | str | bool,
    ) -> None:
        if store is None:
            if not uri or not urlsplit(uri).path:
                raise ConfigurationError("ews-gateway+sqlite needs the store's directory")
            store = EmbeddedStore(urlsplit(uri).path)
        self._store = store
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return sqlite3.Error

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add AMOUNT to KEY's count; a count that expired starts again, for EXPIRY seconds."""
        with self._store.writing() as db:
            now = self._store.clock()
            row = db.execute(
                "SELECT count, expires_at FROM quota_counters WHERE key = ?", (key,)
            ).fetchone()
            if row is None or row[1] <= now:
                db.execute(
                    "INSERT OR REPLACE INTO quota_counters VALUES (?, ?, ?)",
                    (key, amount, now + expiry),
                )
                return amount
            count = int(row[0]) + amount
            db.execute("UPDATE quota_counters SET count = ? WHERE key = ?", (count, key))
            return count

    def get(self, key: str) -> int:
        with self._store.reading() as db:
            row = db.execute(
                "SELECT count FROM quota_counters WHERE key = ? AND expires_at > ?",
                (key, self._store.clock()),
            ).fetchone()
        return 0 if row is None else int(row[0])

    def get_expiry(self, key: str) -> float:
        """Return when KEY's window resets (now when it has no window)."""
        now = self._store.clock()
        with self._store.reading() as db:
            row = db.execute(
                "SELECT expires_at FROM quota_counters WHERE key = ? AND expires_at > ?",
                (key, now),
            ).fetchone()
        return now if row is None else float(row[0])

    def check(self) -> bool:
        try:
            with self._store.reading() as db:
                db.execute("SELECT 1 FROM quota_counters LIMIT 1").fetchall()
        except sqlite3.Error:
            return False
        return True

    def reset(self) -> int | None:
        with self._store.writing() as db:
            return db.execute("DELETE FROM quota_counters").rowcount

    def clear(self, key: str) -> None:
        with self._store.writing() as db:
            db.execute("DELETE FROM quota_counters WHERE key = ?", (key,))
