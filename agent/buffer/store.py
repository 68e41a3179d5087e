"""The durable store-and-forward buffer: SQLite in WAL mode, one synchronous transaction per window.

Records are appended by the pipeline thread (which only assigns ``seq`` and queues them in memory);
a committer thread writes everything pending, and applies the deletes of acknowledged records, in one
transaction per ``commit_window_s`` (``synchronous=FULL``: one fsync per window, whatever the rate).
The publisher takes committed records in three lanes, in this order:

1. *urgent*: events and status, always first;
2. *live*: fixes and signals appended since the link last (re)connected;
3. *backlog*: older fixes and signals, which the caller may rate-cap (``backlog_allowance``).

Order within each lane is the order of ``seq``. A record leaves the disk only on :meth:`ack`; one taken
and not acknowledged comes back after ``timeout_s`` or on :meth:`requeue_all`.

Sequence numbers never repeat: the next one is kept in the store, and a reserve file beside it is
always ahead of every committed one, so a store moved aside as corrupt (or emptied) continues above it.
"""

from __future__ import annotations

import bisect
import errno
import heapq
import itertools
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import msgspec

from agent.clock import Clock
from agent.config import BufferConfig
from agent.record import PRIORITY, Record, Status

log = logging.getLogger(__name__)

DB_NAME = "buffer.sqlite"
RESERVE_NAME = "seq.reserve"
# The reserve file is rewritten (and fsynced) once per this many sequence numbers.
SEQ_BLOCK = 1_000_000
# SQLite's own cost of a row beyond its body (rowid, cell header, b-tree slack), for the size cap.
ROW_OVERHEAD = 16
PAGE_SIZE = 1024
# Acknowledged records are deleted at most this often (or when this many are waiting): one page
# rewrite per window instead of three on a slow trickle of acks.
DELETE_INTERVAL_S = 10.0
DELETE_BATCH = 20_000
# Free space kept on the buffer's filesystem: the WAL (cut back to 4 MiB) and a checkpoint need room.
DISK_HEADROOM = 8 * 1024 * 1024
# Records waiting in memory for a store that cannot take them (disk full): beyond this, the oldest
# positions are dropped and counted, so memory stays bounded however long the disk stays full.
MAX_PENDING = 200_000

URGENT, LIVE, BACKLOG = "urgent", "live", "backlog"
LANES = (URGENT, LIVE, BACKLOG)
_TABLE = {URGENT: "urgent", LIVE: "records", BACKLOG: "records"}

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)


class BufferError(Exception):
    """The buffer cannot be used (e.g. its directory cannot be created)."""


@dataclass
class _Taken:
    lane: str
    seqs: set[int]
    low: int
    high: int
    deadline: float


@dataclass
class _Counters:
    dropped: dict[str, int] = field(default_factory=dict)
    resets: int = 0
    commits: int = 0
    last_commit_s: float = 0.0


class DurableBuffer:
    """The on-disk queue between the pipeline and the MQTT link (see the module docstring)."""

    LANES = LANES

    def __init__(self, directory: Path, config: BufferConfig, clock: Clock) -> None:
        self._dir = Path(directory)
        self._path = self._dir / DB_NAME
        self._reserve_path = self._dir / RESERVE_NAME
        self._config = config
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        # _pending_lock guards what append() touches; _db_lock the connection and in-flight state.
        self._pending_lock = threading.Lock()
        self._db_lock = threading.RLock()
        self._commit_lock = threading.Lock()
        self._pending: list[Record] = []
        self._appended = threading.Event()  # wakes the committer (leading-edge grouping)
        self._next_seq = 1
        self._reserve = 0
        self._committed_next = 1
        self._live_from = 1
        self._cursor = {URGENT: 0, LIVE: 0, BACKLOG: 0}
        self._resend: dict[str, list[int]] = {URGENT: [], LIVE: [], BACKLOG: []}
        self._inflight: dict[int, _Taken] = {}
        self._tokens = itertools.count()
        # Acknowledged ranges not yet deleted: applied every DELETE_INTERVAL_S (or on flush, or under
        # pressure), so that steady acks do not rewrite pages every window (SD-card wear).
        self._deletes = _RangeSet()
        self._acked_rows = 0
        self._deletes_applied_at = time.monotonic()
        self._meta_next: int | None = None  # the next_seq value the store holds
        self._depth = 0
        self._bytes = 0
        self._counters = _Counters()
        self._states: set[str] = set()  # "full" (at max_bytes), "short" (of disk space)
        self._disk_full = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the store; a corrupt or truncated one is moved aside and a new one started."""
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BufferError(f"cannot create the buffer directory {self._dir}: {exc.strerror or exc}") from exc
        self._reserve = self._read_reserve()
        moved = False
        try:
            stored_next = self._connect()
        except sqlite3.Error as exc:
            if not _is_corrupt(exc):
                # Locked by another agent, an I/O error: moving a healthy store aside would lose it.
                raise BufferError(f"cannot open the buffer {self._path}: {exc}") from exc
            self._move_aside(f"cannot open: {exc}", lost=None)
            moved = True
            stored_next = self._connect()
        if stored_next is None:
            if self._reserve and not moved:
                # No sequence counter in the store but a reserve beside it: the file was emptied or replaced.
                self._report_reset(f"{self._path} held no sequence counter (emptied or replaced)", lost=None)
            stored_next = max(self._reserve, 1)
        with self._pending_lock:
            self._next_seq = max(self._next_seq, stored_next)
        self._committed_next = self._live_from = stored_next
        self._cursor = {URGENT: 0, LIVE: stored_next, BACKLOG: 0}
        self._ensure_reserve(stored_next)
        self.flush()  # a reset found above is reported durably before anything else happens
        log.info(
            "buffer %s open: %d records (%d bytes), next seq %d", self._path, self._depth, self._bytes, stored_next
        )

    def start(self) -> None:
        """Start the committer thread (after :meth:`open`)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._committer, name="buffer-commit", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the committer, commit what is pending, close the store."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "DurableBuffer":
        self.open()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the pipeline's side ------------------------------------------------------------------

    def append(self, records: list[Record]) -> None:
        """Accept ``records``: assign each its ``seq``; durable within ``commit_window_s``."""
        if not records:
            return
        with self._pending_lock:
            seq = self._next_seq
            for record in records:
                record.seq = seq
                seq += 1
            self._next_seq = seq
            self._pending.extend(records)
        self._appended.set()

    def flush(self) -> None:
        """Commit everything appended so far, now, and apply every acknowledgement."""
        with self._commit_lock:
            self._commit(force=True)

    # -- the publisher's side -----------------------------------------------------------------

    def lane_of(self, record: Record) -> str:
        """The lane a taken record came from."""
        if record.priority == 0:
            return URGENT
        return BACKLOG if record.seq < self._live_from else LIVE

    @property
    def live_from_seq(self) -> int:
        """Records with a lower ``seq`` were in the store when the link last (re)connected: backlog."""
        return self._live_from

    def take(
        self,
        max_records: int,
        *,
        timeout_s: float = 30.0,
        backlog_allowance: int | None = None,
        lanes: tuple[str, ...] = LANES,
    ) -> list[Record]:
        """Up to ``max_records`` committed records not in flight, all from one lane (urgent, live, backlog).

        ``backlog_allowance`` caps how many backlog records may be returned (None: no cap); ``lanes``
        limits which lanes are considered (in the fixed order urgent, live, backlog). Records not
        acknowledged within ``timeout_s`` are returned again by a later call.
        """
        now = self._clock.monotonic()
        with self._db_lock:
            if self._conn is None:
                return []
            self._expire(now)
            for lane in LANES:
                if lane not in lanes:
                    continue
                limit = max_records
                if lane == BACKLOG and backlog_allowance is not None:
                    limit = min(limit, backlog_allowance)
                if limit <= 0:
                    continue
                rows = self._fetch(lane, limit)
                if rows:
                    seqs = {seq for seq, _ in rows}
                    self._inflight[next(self._tokens)] = _Taken(lane, seqs, min(seqs), max(seqs), now + timeout_s)
                    return [_decoder.decode(body) for _, body in rows]
            return []

    def ack(self, ranges: Iterable[tuple[int, int]]) -> None:
        """The collector stored these inclusive ``(first, last)`` ranges: delete them at the next commit."""
        ranges = [(int(a), int(b)) for a, b in ranges if int(a) <= int(b)]
        if not ranges:
            return
        with self._db_lock:
            for low, high in ranges:
                for new_low, new_high in self._deletes.add(low, high):
                    self._acked_rows += self._count_rows(new_low, new_high)
            for token, taken in list(self._inflight.items()):
                for low, high in ranges:
                    if low <= taken.high and high >= taken.low:
                        taken.seqs = {s for s in taken.seqs if not low <= s <= high}
                if not taken.seqs:
                    del self._inflight[token]

    def requeue_all(self) -> None:
        """Forget what is in flight (the link reconnected): everything stored is sent again, as backlog."""
        self.flush()
        with self._db_lock:
            self._inflight.clear()
            for heap in self._resend.values():
                heap.clear()
            self._live_from = self._committed_next
            self._cursor = {URGENT: 0, LIVE: self._live_from, BACKLOG: 0}

    def inflight_batches(self) -> int:
        """Takes not yet fully acknowledged and not timed out (the link caps these)."""
        with self._db_lock:
            self._expire(self._clock.monotonic())
            return len(self._inflight)

    def inflight_records(self) -> int:
        """Records taken and not yet acknowledged."""
        with self._db_lock:
            return sum(len(t.seqs) for t in self._inflight.values())

    def stats(self) -> dict:
        """Figures for the status topic and logs."""
        with self._db_lock:
            oldest = self._oldest_utc()
            depth, size = self._depth - self._acked_rows, self._bytes
            inflight = sum(len(t.seqs) for t in self._inflight.values())
        with self._pending_lock:
            pending = len(self._pending)
            appended = self._next_seq - 1
        return {
            "depth": depth,
            "bytes": size,
            "max_bytes": self._config.max_bytes,
            "oldest_utc": oldest,
            "pending": pending,
            "inflight": inflight,
            "appended_seq": appended,
            "committed_seq": self._committed_next - 1,
            "live_from_seq": self._live_from,
            "dropped": dict(self._counters.dropped),
            "dropped_total": sum(self._counters.dropped.values()),
            "resets": self._counters.resets,
            "commits": self._counters.commits,
            "last_commit_s": self._counters.last_commit_s,
            "disk_full": self._disk_full,
        }

    # -- committing ---------------------------------------------------------------------------

    def _committer(self) -> None:
        # Leading-edge grouping: a record appended when no write has been committed within the last
        # window is committed at once (at vehicle rates, one record a second, that is every record,
        # and its latency is a fsync, not a window); records arriving within a window of the last
        # write wait for the window's end and share its fsync. At most one write commit per window
        # either way. Idle ticks (nothing pending) keep applying acknowledged deletions.
        window = self._config.commit_window_s
        last_write = float("-inf")
        failing = False
        while not self._stop.is_set():
            self._appended.wait(window)
            earliest = last_write + window
            if self._appended.is_set() and time.monotonic() < earliest and self._stop.wait(earliest - time.monotonic()):
                break
            if self._stop.is_set():
                break
            self._appended.clear()
            try:
                with self._commit_lock:
                    wrote = self._commit(force=False)
            except sqlite3.Error as exc:
                if not failing:
                    log.error("buffer %s: commit failed (%s); keeping the records in memory, retrying each window", self._path, exc)
                failing = True
                self._stop.wait(window)
                continue
            except Exception:  # a bug: the committer must outlive it, loudly
                log.exception("buffer commit failed; retrying next window")
                self._stop.wait(window)
                continue
            if wrote:
                last_write = time.monotonic()
            if failing:
                log.warning("buffer %s: commits work again", self._path)
                failing = False

    def _commit(self, force: bool) -> bool:
        """Write what is pending (and due deletions) in one transaction; True when records were written."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
        with self._db_lock:
            if self._conn is None:
                self._requeue_pending(batch)
                return False
            apply = bool(self._deletes) and (
                force
                or time.monotonic() - self._deletes_applied_at >= DELETE_INTERVAL_S
                or self._acked_rows >= DELETE_BATCH
                or self._bytes > self._config.max_bytes * 0.9
                or self._disk_short()
            )
            deletes = self._deletes.ranges() if apply else []
            if not batch and not deletes:
                return False
            started = time.perf_counter()
            try:
                self._write(batch, deletes)
            except (sqlite3.Error, OSError) as exc:  # OSError: the reserve file on a full disk
                self._rollback()
                if _is_corrupt(exc):
                    lost = self._depth
                    self._requeue_pending(batch)
                    self._move_aside(f"write failed: {exc}", lost=lost)
                    self._connect()
                    return False
                if not (_is_full(exc) and self._retry_after_making_room(batch, deletes, exc)):
                    self._requeue_pending(batch)
                    if _is_full(exc):
                        return False  # in memory, bounded; tried again next window
                    raise
            if deletes:
                self._deletes = _RangeSet()
                self._acked_rows = 0
                self._deletes_applied_at = time.monotonic()
            if self._disk_full:
                self._disk_full = False
                log.warning("buffer %s: writing again after a full disk", self._path)
            self._counters.commits += 1
            self._counters.last_commit_s = time.perf_counter() - started
            return bool(batch)

    def _write(self, batch: list[Record], deletes: list[tuple[int, int]]) -> None:
        conn = self._conn
        assert conn is not None
        rows = {"urgent": [], "records": []}
        size = growth = 0
        for record in batch:
            body = _encoder.encode(record)
            size += len(body) + ROW_OVERHEAD
            if not _is_drop_report(record):
                growth += len(body) + ROW_OVERHEAD
            rows["urgent" if PRIORITY[record.kind] == 0 else "records"].append((record.seq, body))
        top = batch[-1].seq if batch else 0  # pending is always in seq order (see append / _requeue_pending)
        if batch:
            self._ensure_reserve(top + 1)
        conn.execute("BEGIN IMMEDIATE")
        for table, table_rows in rows.items():
            if table_rows:
                conn.executemany(f"INSERT OR REPLACE INTO {table}(seq, body) VALUES (?, ?)", table_rows)
        removed_rows, removed_bytes = 0, 0
        for low, high in deletes:
            for table in ("urgent", "records"):
                count, nbytes = conn.execute(
                    f"SELECT count(*), coalesce(sum(length(body)), 0) FROM {table} WHERE seq BETWEEN ? AND ?",
                    (low, high),
                ).fetchone()
                if count:
                    conn.execute(f"DELETE FROM {table} WHERE seq BETWEEN ? AND ?", (low, high))
                    removed_rows += count
                    removed_bytes += nbytes + count * ROW_OVERHEAD
        committed_next = top + 1 if batch else self._committed_next
        depth = self._depth + len(batch) - removed_rows
        total = self._bytes + size - removed_bytes
        over_cap = total - self._config.max_bytes
        # Short of disk space: drop as much as this window adds (its drop reports aside), so the store
        # stops growing before SQLite meets a full disk (where even a checkpoint or a delete may fail).
        short = self._disk_short()
        # A drop makes 1 % of the cap free (hysteresis), so the drop's own report does not cause the next.
        excess = max(over_cap + self._config.max_bytes // 100 if over_cap > 0 else 0, growth if short else 0)
        dropped: dict[str, int] = {}
        if excess > 0:
            freed_rows, freed_bytes, dropped = self._drop_oldest(excess)
            depth -= freed_rows
            total -= freed_bytes
        # The stored next_seq matters only when the newest row may be gone (open() takes the larger of it
        # and max(seq) + 1): written when rows were deleted or dropped, not every window (one page less).
        if self._meta_next is None or removed_rows or dropped:
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('next_seq', ?)", (committed_next,))
            meta_next = committed_next
        else:
            meta_next = self._meta_next
        conn.execute("COMMIT")
        self._meta_next = meta_next
        self._committed_next = committed_next
        self._depth, self._bytes = depth, total
        if dropped:
            self._count_drops(dropped)
            self._report_drops(dropped, "buffer_full" if over_cap > 0 else "disk_full")
        self._log_state("full", over_cap > 0, f"buffer {self._path} is at its cap ({self._config.max_bytes} bytes): dropping the oldest positions",
                        f"buffer {self._path} below its cap again; {self._dropped_total()} records dropped so far")
        self._log_state("short", short, f"less than {DISK_HEADROOM} bytes free for {self._path}: dropping the oldest positions as new records come",
                        f"disk space for {self._path} is back; {self._dropped_total()} records dropped so far")

    def _disk_short(self) -> bool:
        try:
            st = os.statvfs(self._dir)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < DISK_HEADROOM

    def _log_state(self, name: str, now: bool, entered: str, left: str) -> None:
        """One warning when a condition starts and one when it ends, never one per window."""
        if now != (name in self._states):
            (self._states.add if now else self._states.discard)(name)
            log.warning("%s", entered if now else left)

    def _drop_oldest(self, excess: int) -> tuple[int, int, dict[str, int]]:
        """Delete the oldest positions/signals (then events) until ``excess`` bytes are freed."""
        conn = self._conn
        assert conn is not None
        freed_rows, freed_bytes, dropped = 0, 0, {}
        for table in ("records", "urgent"):
            last = None
            for seq, body in conn.execute(f"SELECT seq, body FROM {table} ORDER BY seq"):
                if freed_bytes >= excess:
                    break
                kind = _decoder.decode(body).kind
                dropped[kind] = dropped.get(kind, 0) + 1
                freed_rows += 1
                freed_bytes += len(body) + ROW_OVERHEAD
                last = seq
            if last is not None:
                conn.execute(f"DELETE FROM {table} WHERE seq <= ?", (last,))
            if freed_bytes >= excess:
                break
        return freed_rows, freed_bytes, dropped

    def _report_drops(self, dropped: dict[str, int], reason: str) -> None:
        """Tell the backend: a status record, committed with the next window."""
        attrs: dict = {"reason": reason, "count": sum(dropped.values())}
        attrs.update({f"dropped_{kind}": n for kind, n in sorted(dropped.items())})
        now = self._clock
        self.append([Record(utc=now.wall(), mono=now.monotonic(), data=Status(type="records_dropped", attrs=attrs))])

    def _count_drops(self, dropped: dict[str, int]) -> None:
        for kind, n in dropped.items():
            self._counters.dropped[kind] = self._counters.dropped.get(kind, 0) + n

    def _dropped_total(self) -> int:
        return sum(self._counters.dropped.values())

    def _retry_after_making_room(self, batch: list[Record], deletes: list[tuple[int, int]], exc: Exception) -> bool:
        """The disk is full: drop the oldest positions and write this window again. False: still no room
        (the caller keeps the window in memory, bounded, and tries again next window)."""
        if not self._disk_full:
            self._disk_full = True
            log.error("buffer %s: the disk is full (%s); dropping the oldest positions to make room", self._path, exc)
        conn = self._conn
        # Fold the WAL into the database so that the WAL file's space is reused for what follows.
        self._checkpoint()
        try:
            conn.execute("BEGIN IMMEDIATE")
            rows, nbytes, dropped = self._drop_oldest(max(self._bytes // 20, len(batch) * 200, 64 * 1024))
            conn.execute("COMMIT")
        except sqlite3.Error:
            self._rollback()
            rows, nbytes, dropped = 0, 0, {}
        self._depth -= rows
        self._bytes -= nbytes
        if dropped:
            self._count_drops(dropped)
            self._report_drops(dropped, "disk_full")
        self._checkpoint()
        try:
            self._write(batch, deletes)
        except (sqlite3.Error, OSError):
            self._rollback()
            return False
        return True

    def _checkpoint(self) -> None:
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # still full: the drop below may free pages for the next try
            log.debug("buffer checkpoint failed: %s", exc)

    def _requeue_pending(self, batch: list[Record]) -> None:
        """Put an uncommitted window back in front of what was appended since; bounded by MAX_PENDING."""
        with self._pending_lock:
            self._pending = batch + self._pending
            excess = len(self._pending) - MAX_PENDING
            if excess <= 0:
                return
            keep, dropped = [], {}
            for record in self._pending:
                if excess > 0 and PRIORITY[record.kind] == 1:
                    dropped[record.kind] = dropped.get(record.kind, 0) + 1
                    excess -= 1
                else:
                    keep.append(record)
            self._pending = keep
        self._count_drops(dropped)

    def _rollback(self) -> None:
        try:
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # -- taking -------------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        for token, taken in list(self._inflight.items()):
            if taken.deadline <= now:
                del self._inflight[token]
                for seq in taken.seqs:
                    heapq.heappush(self._resend[taken.lane], seq)

    def _fetch(self, lane: str, limit: int) -> list[tuple[int, bytes]]:
        conn = self._conn
        assert conn is not None
        table = _TABLE[lane]
        heap = self._resend[lane]
        if heap:
            wanted = []
            while heap and len(wanted) < limit:
                seq = heapq.heappop(heap)
                if seq not in self._deletes:
                    wanted.append(seq)
            if wanted:
                marks = ",".join("?" * len(wanted))
                rows = conn.execute(f"SELECT seq, body FROM {table} WHERE seq IN ({marks}) ORDER BY seq", wanted).fetchall()
                if rows:
                    return rows
        low = self._cursor[lane]
        high = self._live_from if lane == BACKLOG else self._committed_next
        if lane == LIVE:
            low = max(low, self._live_from)
        rows = conn.execute(
            f"SELECT seq, body FROM {table} WHERE seq >= ? AND seq < ? ORDER BY seq LIMIT ?", (low, high, limit)
        ).fetchall()
        if rows:
            self._cursor[lane] = rows[-1][0] + 1
        return [row for row in rows if row[0] not in self._deletes] if self._deletes else rows

    def _count_rows(self, low: int, high: int) -> int:
        if self._conn is None:
            return 0
        return sum(
            self._conn.execute(f"SELECT count(*) FROM {table} WHERE seq BETWEEN ? AND ?", (low, high)).fetchone()[0]
            for table in ("urgent", "records")
        )

    def _oldest_utc(self) -> float | None:
        if self._conn is None:
            return None
        oldest = None
        for table in ("urgent", "records"):
            row = self._conn.execute(f"SELECT body FROM {table} ORDER BY seq LIMIT 1").fetchone()
            if row:
                utc = _decoder.decode(row[0]).utc
                oldest = utc if oldest is None else min(oldest, utc)
        return oldest

    # -- the store file -----------------------------------------------------------------------

    def _connect(self) -> int | None:
        """Open the SQLite file and check it; returns the stored next seq, None for a new store."""
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            # One agent per store: a second process fails to open it instead of sharing sequence numbers.
            # (Exclusive locking also keeps the WAL index in memory, not in a mmapped -shm file.)
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            # 1 KiB pages (a new store only; an existing one keeps its size): a commit window's WAL frames
            # are whole pages, and at vehicle rates a window adds far less than 4 KiB. Measured in
            # BENCHMARKS.md: a quarter to a third fewer bytes written per record, the same ingest rate.
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL in WAL mode: every commit fsyncs the WAL, so a committed window survives a power cut.
            conn.execute("PRAGMA synchronous=FULL")
            # After a checkpoint the WAL file is cut back to 4 MiB: a burst does not keep its space forever.
            conn.execute("PRAGMA journal_size_limit=4194304")
            check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if check != "ok":
                raise _Corrupt(f"quick_check: {check}")
            conn.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            for table in ("urgent", "records"):
                conn.execute(f"CREATE TABLE IF NOT EXISTS {table}(seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            depth, size, high = 0, 0, 0
            for table in ("urgent", "records"):
                count, nbytes, top = conn.execute(
                    f"SELECT count(*), coalesce(sum(length(body)), 0), coalesce(max(seq), 0) FROM {table}"
                ).fetchone()
                depth, size, high = depth + count, size + nbytes + count * ROW_OVERHEAD, max(high, top)
        except sqlite3.DatabaseError:
            conn.close()
            raise
        self._conn = conn
        self._depth, self._bytes = depth, size
        if row is None:
            return None
        return max(int(row[0]), high + 1)

    def _move_aside(self, reason: str, lost: int | None) -> None:
        """Rename the unusable store (and its WAL) out of the way; the agent goes on with a new one."""
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock.wall()))
        aside = self._path.with_name(f"{DB_NAME}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self._path}{suffix}")
            if src.exists():
                try:
                    os.replace(src, f"{aside}{suffix}")
                except OSError as exc:
                    log.error("buffer: cannot move %s aside (%s); deleting it", src, exc)
                    src.unlink(missing_ok=True)
        self._depth = self._bytes = 0
        self._inflight.clear()
        for heap in self._resend.values():
            heap.clear()
        self._cursor = {URGENT: 0, LIVE: 0, BACKLOG: 0}
        self._deletes = _RangeSet()
        self._acked_rows = 0
        self._meta_next = None
        log.error("buffer %s is unusable (%s): moved aside to %s, starting a new one", self._path, reason, aside)
        self._report_reset(reason, lost=lost)

    def _report_reset(self, reason: str, lost: int | None) -> None:
        """Count the reset and queue a status record for the backend (committed with the next window)."""
        self._counters.resets += 1
        attrs: dict = {"reason": reason[:200]}
        if lost is not None:
            attrs["lost_records"] = lost
        with self._pending_lock:
            # Above every seq the lost store may have committed (the reserve file is ahead of them all).
            self._next_seq = max(self._next_seq, self._reserve)
        now = self._clock
        self.append([Record(utc=now.wall(), mono=now.monotonic(), data=Status(type="buffer_reset", attrs=attrs))])

    def _read_reserve(self) -> int:
        try:
            return int(self._reserve_path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.error("buffer: cannot read %s (%s)", self._reserve_path, exc)
            return 0

    def _ensure_reserve(self, next_seq: int) -> None:
        """Keep the reserve file ahead of every seq that may be committed (written and fsynced)."""
        if next_seq <= self._reserve:
            return
        value = next_seq + SEQ_BLOCK
        tmp = self._reserve_path.with_suffix(".tmp")
        with open(tmp, "w") as handle:
            handle.write(f"{value}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self._reserve_path)
        dir_fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._reserve = value


def _is_drop_report(record: Record) -> bool:
    return record.kind == "status" and record.data.type == "records_dropped"


class _RangeSet:
    """Disjoint inclusive integer ranges, kept sorted: membership by bisection."""

    def __init__(self) -> None:
        self._lows: list[int] = []
        self._highs: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._lows)

    def __contains__(self, value: int) -> bool:
        i = bisect.bisect_right(self._lows, value) - 1
        return i >= 0 and value <= self._highs[i]

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lows, self._highs))

    def add(self, low: int, high: int) -> list[tuple[int, int]]:
        """Add ``[low, high]``; returns the parts of it that were not already in the set."""
        new: list[tuple[int, int]] = []
        start = bisect.bisect_left(self._highs, low - 1)  # first range that touches or follows low
        end = start
        cursor = low
        merged_low, merged_high = low, high
        while end < len(self._lows) and self._lows[end] <= high + 1:
            if self._lows[end] > cursor:
                new.append((cursor, min(high, self._lows[end] - 1)))
            cursor = max(cursor, self._highs[end] + 1)
            merged_low, merged_high = min(merged_low, self._lows[end]), max(merged_high, self._highs[end])
            end += 1
        if cursor <= high:
            new.append((cursor, high))
        self._lows[start:end] = [merged_low]
        self._highs[start:end] = [merged_high]
        return new


class _Corrupt(sqlite3.DatabaseError):
    """The store fails its integrity check."""


def _is_corrupt(exc: Exception) -> bool:
    """Damage to the file itself (SQLITE_CORRUPT, SQLITE_NOTADB), as opposed to locks or I/O errors."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, _Corrupt) or (code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB))


def _is_full(exc: Exception) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    code = getattr(exc, "sqlite_errorcode", None)
    return (code is not None and code & 0xFF == sqlite3.SQLITE_FULL) or "disk is full" in str(exc)
