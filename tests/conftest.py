"""Fixtures every test module reuses: a real Mosquitto on a free port, a pty-backed GPS, the
shared corpus, and temporary data directories."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import settings

from sim.broker import MosquittoBroker, free_port, mosquitto_exe, wait_for_port  # noqa: F401 (re-exported to tests)

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"

# CI runs the property tests on a fixed sequence of examples, so what passed in a rehearsal passes
# there; other runs explore new ones, and a failure they find is pinned with @example.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")


def _corpus_dir() -> Path:
    if CORPUS.is_dir():
        return CORPUS
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the shared corpus is missing at {CORPUS}")
    pytest.skip(f"real-data test: the shared corpus is not at {CORPUS} (only developers' machines and CI have it)")


@pytest.fixture(scope="session")
def corpus() -> Path:
    """../shared/corpus: skipped on a user's clone, a failure in CI."""
    return _corpus_dir()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def mosquitto(tmp_path_factory) -> MosquittoBroker:
    """A private Mosquitto on a free port (no persistence, like Mosquitto's default)."""
    if mosquitto_exe() is None:
        pytest.fail("mosquitto is not installed: apt-get install mosquitto")
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def collector_sqlite(mosquitto, tmp_path_factory):
    """The collector (in-process, topic prefix "telematics") on a temporary SQLite file, against ``mosquitto``.

    ``.db_path`` is the file; ``.stop()`` / ``.start()`` restart it; ``.stats()`` counts what it stored.
    """
    from collector.service import Collector

    collector = Collector("127.0.0.1", mosquitto.port, "telematics", tmp_path_factory.mktemp("collector") / "collector.sqlite")
    collector.start()
    yield collector
    collector.stop()


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """An empty directory standing in for /var/lib/telematics-agent."""
    path = tmp_path / "data"
    path.mkdir()
    return path


class PtyGps:
    """A real pseudo-terminal: tests write NMEA to ``master_fd``; the agent opens ``path`` with pyserial."""

    def __init__(self) -> None:
        self.master_fd, self.slave_fd = os.openpty()
        self.path = os.ttyname(self.slave_fd)

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("ascii")
        os.write(self.master_fd, data)

    def close(self) -> None:
        for fd in (self.master_fd, self.slave_fd):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pty_gps():
    """A pty-backed GPS receiver."""
    gps = PtyGps()
    yield gps
    gps.close()


@pytest.fixture(scope="session")
def ota_releases(tmp_path_factory):
    """Signed releases of this checkout (tests/ota_helpers.py), each built once per session."""
    from ota_helpers import ReleaseFactory

    return ReleaseFactory(tmp_path_factory.mktemp("ota-releases"))


POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_dsn():
    """A DSN for PostgreSQL's database ``test`` on 127.0.0.1:5432 whose search_path is a fresh schema,
    dropped afterwards. Skipped without a server on a user's machine, a failure in CI."""
    psycopg = pytest.importorskip("psycopg")
    import uuid

    try:
        admin = psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but PostgreSQL is not reachable at {POSTGRES}: {exc}")
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()
