"""Journald-friendly log lines and the rate limit on repeated errors."""

from __future__ import annotations

import io
import logging
import os

import pytest

from agent.ops.logging import RepeatFilter, setup_logging, under_journal


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_under_journal_lines_carry_priority_and_no_timestamp(tmp_path, restore_root):
    path = tmp_path / "journal-stream"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        setup_logging("DEBUG", stream=stream, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        log = logging.getLogger("agent.test")
        log.debug("d")
        log.info("link up")
        log.warning("w")
        log.error("e")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("crashed")
    lines = path.read_text().splitlines()
    assert lines[:4] == ["<7>agent.test: d", "<6>agent.test: link up", "<4>agent.test: w", "<3>agent.test: e"]
    assert lines[4] == "<3>agent.test: crashed"
    assert all(line.startswith("<3>") for line in lines[4:]) and any("ValueError: boom" in l for l in lines[5:])


def test_by_hand_lines_carry_a_timestamp(restore_root):
    stream = io.StringIO()
    setup_logging("INFO", stream=stream, environ={})
    logging.getLogger("agent.test").info("hello")
    line = stream.getvalue().strip()
    assert line.endswith("INFO agent.test: hello") and line[:4].isdigit()


def test_another_files_journal_stream_is_not_ours(tmp_path):
    with open(tmp_path / "a", "w") as a:
        assert not under_journal(a, {"JOURNAL_STREAM": "1:2"})
        assert not under_journal(a, {})


def test_repeated_errors_are_counted_not_repeated(restore_root):
    now = [0.0]
    stream = io.StringIO()
    handler = setup_logging("INFO", stream=stream, environ={})
    handler.filters[:] = [RepeatFilter(60.0, monotonic=lambda: now[0])]
    log = logging.getLogger("agent.gps")
    for i in range(500):
        now[0] = i * 0.1  # 50 s of a failing port
        log.warning("cannot open %s: %s", "/dev/gps0", f"error {i}")
    log.info("an info line is never limited")
    log.info("an info line is never limited")
    now[0] = 61.0
    log.warning("cannot open %s: %s", "/dev/gps0", "again")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].endswith("cannot open /dev/gps0: error 0")
    assert lines[3].endswith("cannot open /dev/gps0: again (repeated 499 more times in the last 61 s)")


def test_different_messages_are_limited_separately():
    f = RepeatFilter(60.0, monotonic=lambda: 0.0)

    def rec(msg, level=logging.ERROR):
        return logging.LogRecord("agent.x", level, __file__, 1, msg, (), None)

    assert f.filter(rec("a")) and f.filter(rec("b")) and f.filter(rec("a", logging.WARNING))
    assert not f.filter(rec("a")) and not f.filter(rec("b"))
