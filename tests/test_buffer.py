"""The durable buffer on real SQLite files: commit, take, ack, lanes, caps, corruption, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.buffer.store import DB_NAME, PAGE_SIZE, RESERVE_NAME, BufferError, DurableBuffer
from agent.config import BufferConfig
from agent.record import Event, Fix, Record, Signal, Status

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    """Wall and monotonic time the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def wall(self) -> float:
        return 1.7e9 + self.now

    def monotonic(self) -> float:
        return self.now


def fix(i: int) -> Record:
    return Record(utc=1.7e9 + i, mono=float(i), data=Fix(lat=48.0 + i * 1e-5, lon=11.5, speed_mps=10.0))


def event(i: int) -> Record:
    return Record(utc=1.7e9 + i, mono=float(i), data=Event(type="harsh_braking", lat=48.0, lon=11.5, attrs={"g": 0.5}))


def open_buffer(directory: Path, clock=None, **config) -> DurableBuffer:
    buf = DurableBuffer(directory, BufferConfig(**config), clock or FakeClock())
    buf.open()
    return buf


def drain(buf: DurableBuffer) -> list[Record]:
    """Every committed record, taken and acknowledged."""
    out: list[Record] = []
    while batch := buf.take(1000):
        out.extend(batch)
        buf.ack([(r.seq, r.seq) for r in batch])
    return out


def test_append_assigns_increasing_seq_and_only_committed_records_are_taken(data_dir):
    buf = open_buffer(data_dir)
    records = [fix(i) for i in range(5)]
    buf.append(records)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert buf.take(10) == [], "nothing is taken before it is committed"
    buf.flush()
    taken = buf.take(10)
    assert [r.seq for r in taken] == [1, 2, 3, 4, 5]
    assert taken[0].data == records[0].data
    assert buf.take(10) == [], "records in flight are not taken twice"
    buf.close()


def test_ack_deletes_and_unacked_come_back_after_timeout_or_requeue(data_dir):
    clock = FakeClock()
    buf = open_buffer(data_dir, clock)
    buf.append([fix(i) for i in range(10)])
    buf.flush()
    first = buf.take(4, timeout_s=30)
    second = buf.take(4, timeout_s=30)
    buf.ack([(first[0].seq, first[-1].seq)])
    buf.flush()
    assert buf.stats()["depth"] == 6
    assert buf.inflight_batches() == 1
    clock.now += 31
    assert buf.inflight_batches() == 0, "a timed-out batch no longer counts against the link's cap"
    again = buf.take(10, timeout_s=30)
    assert [r.seq for r in again] == [r.seq for r in second], "the unacked batch comes back, in order"
    rest = buf.take(10)
    assert [r.seq for r in rest] == [9, 10]
    buf.requeue_all()
    assert [r.seq for r in buf.take(10)] == [5, 6, 7, 8, 9, 10]
    buf.close()


def test_events_and_status_go_first_and_order_within_each_kind_is_kept(data_dir):
    buf = open_buffer(data_dir)
    mixed = []
    for i in range(30):
        mixed.append(fix(i))
        mixed.append(Record(utc=1.7e9 + i, mono=i, data=Signal(name="rpm", value=800.0 + i)))
        if i % 10 == 0:
            mixed.append(event(i))
            mixed.append(Record(utc=1.7e9 + i, mono=i, data=Status(type="ignition_on")))
    buf.append(mixed)
    buf.flush()
    got = []
    while batch := buf.take(7):
        got.extend(batch)
    kinds = [r.kind for r in got]
    assert set(kinds[:6]) == {"event", "status"} and "event" not in kinds[6:] and "status" not in kinds[6:]
    for kind in ("fix", "signal", "event", "status"):
        seqs = [r.seq for r in got if r.kind == kind]
        assert seqs == sorted(seqs) and len(seqs) == sum(1 for r in mixed if r.kind == kind)
    buf.close()


def test_live_records_go_before_the_backlog_which_the_caller_can_cap(data_dir):
    buf = open_buffer(data_dir)
    buf.append([fix(i) for i in range(100)])
    buf.close()
    buf = open_buffer(data_dir)  # what was stored before this start is backlog
    assert buf.live_from_seq == 101
    buf.append([fix(i) for i in range(100, 110)])
    buf.flush()
    live = buf.take(60, backlog_allowance=0)
    assert [r.seq for r in live] == list(range(101, 111))
    assert buf.take(60, backlog_allowance=0) == [], "no backlog without allowance"
    backlog = buf.take(60, backlog_allowance=25)
    assert [r.seq for r in backlog] == list(range(1, 26))
    buf.close()


def test_sequence_numbers_continue_across_reopen_even_when_all_was_acked(data_dir):
    buf = open_buffer(data_dir)
    buf.append([fix(i) for i in range(50)])
    buf.flush()
    drain(buf)
    buf.close()
    buf = open_buffer(data_dir)
    assert buf.stats()["depth"] == 0
    more = [fix(0)]
    buf.append(more)
    assert more[0].seq == 51
    buf.close()


def test_a_new_store_has_small_pages_and_one_made_with_4_kib_pages_still_opens(data_dir, tmp_path):
    """New stores use PAGE_SIZE (fewer bytes written per commit); a store an earlier release made with
    SQLite's default 4 KiB pages keeps them and keeps its records."""
    import sqlite3

    buf = open_buffer(data_dir)
    buf.append([fix(i) for i in range(3)])
    buf.close()
    assert sqlite3.connect(data_dir / DB_NAME).execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
    old = tmp_path / "old"
    old.mkdir()
    conn = sqlite3.connect(old / DB_NAME)
    conn.execute("PRAGMA page_size=4096")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE records(seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    conn.close()
    buf = open_buffer(old)
    buf.append([fix(i) for i in range(3)])
    buf.flush()
    assert [r.seq for r in drain(buf)] == [1, 2, 3]
    buf.close()
    assert sqlite3.connect(old / DB_NAME).execute("PRAGMA page_size").fetchone()[0] == 4096


@pytest.mark.parametrize("damage", ["garbage", "truncated", "emptied"])
def test_a_damaged_store_is_moved_aside_and_seq_never_repeats(data_dir, damage, caplog):
    buf = open_buffer(data_dir)
    buf.append([fix(i) for i in range(3000)])
    buf.close()
    path = data_dir / DB_NAME
    size = path.stat().st_size
    if damage == "garbage":
        with open(path, "r+b") as handle:
            handle.seek(0)
            handle.write(os.urandom(4096))
    elif damage == "truncated":
        os.truncate(path, size // 2)
    else:
        os.truncate(path, 0)
    buf = open_buffer(data_dir)
    records = drain(buf)
    stats = buf.stats()
    assert stats["resets"] == 1
    resets = [r for r in records if r.kind == "status" and r.data.type == "buffer_reset"]
    assert len(resets) == 1, "the reset is reported to the backend"
    assert resets[0].seq > 3000
    new = [fix(0)]
    buf.append(new)
    assert new[0].seq > resets[0].seq
    buf.flush()
    buf.close()
    if damage != "emptied":
        assert list(data_dir.glob(f"{DB_NAME}.corrupt-*")), "the damaged file is kept for inspection"
        assert "moved aside" in caplog.text


def test_a_second_agent_cannot_open_a_store_in_use_and_nothing_is_moved_aside(data_dir):
    first = open_buffer(data_dir)
    first.append([fix(0)])
    first.flush()
    with pytest.raises(BufferError, match="locked"):
        open_buffer(data_dir)
    assert not list(data_dir.glob("*.corrupt-*"))
    first.close()
    again = open_buffer(data_dir)
    assert again.stats()["depth"] == 1
    again.close()


def test_a_garbled_reserve_file_does_not_stop_a_healthy_store(data_dir):
    buf = open_buffer(data_dir)
    buf.append([fix(i) for i in range(10)])
    buf.close()
    (data_dir / RESERVE_NAME).write_text("not a number")
    buf = open_buffer(data_dir)
    new = [fix(0)]
    buf.append(new)
    assert new[0].seq == 11
    buf.close()
    assert int((data_dir / RESERVE_NAME).read_text()) > 11, "the reserve is rewritten ahead of the store"


def test_size_cap_drops_oldest_positions_first_counts_and_reports_them(data_dir):
    buf = open_buffer(data_dir, max_bytes=1_000_000)
    events = [event(i) for i in range(20)]
    buf.append(events)
    for start in range(0, 20_000, 2_000):
        fixes = [fix(i) for i in range(start, start + 2_000)]
        buf.append(fixes)
        buf.flush()
    newest = fixes[-1].seq
    stats = buf.stats()
    buf.flush()  # commits the records_dropped status queued by the last drop (which may drop a little more)
    assert stats["bytes"] <= 1_000_000
    assert stats["dropped"].get("fix", 0) > 0 and "event" not in stats["dropped"]
    records = drain(buf)
    kinds = [r.kind for r in records]
    assert kinds.count("event") == 20, "events survive while positions can be dropped"
    fixes = [r.seq for r in records if r.kind == "fix"]
    assert fixes == sorted(fixes) and fixes[-1] == newest, "the oldest positions went, the newest stayed"
    reports = [r.data.attrs for r in records if r.kind == "status" and r.data.type == "records_dropped"]
    assert sum(a["dropped_fix"] for a in reports) == stats["dropped"]["fix"]
    buf.close()


def test_the_committer_makes_records_durable_within_the_window(data_dir):
    buf = DurableBuffer(data_dir, BufferConfig(commit_window_s=0.1), FakeClock())
    buf.open()
    buf.start()
    buf.append([fix(i) for i in range(10)])
    deadline = time.monotonic() + 2
    while buf.stats()["committed_seq"] < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert buf.stats()["committed_seq"] == 10
    buf.close()


CHILD = r"""
import sys, time
from pathlib import Path
from agent.buffer.store import DurableBuffer
from agent.clock import SystemClock
from agent.config import BufferConfig
from agent.record import Fix, Record
buf = DurableBuffer(Path(sys.argv[1]), BufferConfig(commit_window_s=float(sys.argv[2])), SystemClock())
buf.open(); buf.start()
i = 0
while True:
    batch = [Record(utc=1.7e9 + i + k, mono=0.0, data=Fix(lat=48.0, lon=11.0)) for k in range(50)]
    buf.append(batch)
    i += 50
    print("appended", batch[-1].seq, time.monotonic(), "committed", buf.stats()["committed_seq"], flush=True)
    time.sleep(0.005)
"""

WINDOW_S = 0.2


@pytest.mark.parametrize("run", range(3))
def test_sigkill_loses_at_most_the_commit_window(data_dir, run):
    """A child appends ~10k records/s with a 0.2 s window and is SIGKILLed at a random moment.

    Afterwards every record it reported committed is there, and so is every record appended more than
    the window (plus 0.3 s for one commit's own duration and scheduling on a busy machine) before the kill.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), str(WINDOW_S)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    lines = []
    stop_after = 1.0 + run * 0.37
    started = time.monotonic()
    for line in proc.stdout:
        lines.append(line.split())
        if time.monotonic() - started > stop_after:
            break
    kill_at = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    committed = max(int(parts[4]) for parts in lines)
    old_enough = [int(p[1]) for p in lines if float(p[2]) < kill_at - WINDOW_S - 0.3]
    buf = open_buffer(data_dir)
    seqs = [r.seq for r in drain(buf)]
    buf.close()
    assert seqs == list(range(1, len(seqs) + 1)), "a gap-free prefix survives"
    assert len(seqs) >= committed, "everything reported committed survives"
    assert old_enough and len(seqs) >= max(old_enough), "nothing older than the window is lost"


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs: a disk that fills up (mounting needs root)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mountpoint)], capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but a tmpfs cannot be mounted: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_filling_disk_drops_the_oldest_positions_keeps_events_and_never_stops(small_disk, caplog):
    buf = open_buffer(small_disk / "data")
    buf.append([event(i) for i in range(10)])
    filler = small_disk / "other-files"  # someone else fills the disk too
    filler.write_bytes(b"\0" * 10 * 1024 * 1024)
    appended = 0
    for chunk in range(40):  # 40 x 5000 records of about 150 bytes stored: more than the disk holds
        buf.append([fix(i) for i in range(chunk * 5000, chunk * 5000 + 5000)])
        appended += 5000
        buf.flush()
    buf.flush()  # the last records_dropped report
    stats = buf.stats()
    assert "less than" in caplog.text and "bytes free" in caplog.text
    assert not [r for r in caplog.records if r.exc_info]
    assert stats["dropped"].get("fix", 0) > 0 and "event" not in stats["dropped"]
    assert stats["pending"] == 0 and stats["committed_seq"] == stats["appended_seq"], "every window was written"
    records = drain(buf)
    assert sum(1 for r in records if r.kind == "event") == 10, "events survive a full disk"
    reports = [r.data.attrs for r in records if r.kind == "status" and r.data.type == "records_dropped"]
    assert reports and {a["reason"] for a in reports} == {"disk_full"}
    assert sum(a["dropped_fix"] for a in reports) == stats["dropped"]["fix"]
    fixes = [r.seq for r in records if r.kind == "fix"]
    assert fixes == sorted(fixes) and len(fixes) + stats["dropped"]["fix"] == appended
    filler.unlink()
    buf.append([fix(0)])
    buf.flush()
    assert "disk space for" in caplog.text, "the end of the shortage is logged"
    buf.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 15)), max_size=25))
def test_the_ack_range_set_matches_a_plain_set(ranges):
    from agent.buffer.store import _RangeSet

    model: set[int] = set()
    ranged = _RangeSet()
    for low, length in ranges:
        new = ranged.add(low, low + length)
        added = {v for a, b in new for v in range(a, b + 1)}
        assert added == set(range(low, low + length + 1)) - model, "add() reports exactly the new part"
        model |= added
        spans = ranged.ranges()
        assert all(b < c - 1 for (_, b), (c, _) in zip(spans, spans[1:])), "disjoint, sorted, merged"
    assert {v for v in range(-1, 80) if v in ranged} == model
