"""The ``pg_dsn`` fixture: a fresh schema in PostgreSQL's database ``test`` on 127.0.0.1:5432.

Import it into a test module (``from pg_helpers import pg_dsn``). Without a server the test is
skipped on a user's machine and fails in CI (CI machines run PostgreSQL).
"""

from __future__ import annotations

import os
import uuid

import pytest

SERVER = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_dsn():
    """A DSN whose search_path is a fresh schema in database ``test``, dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(SERVER, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but PostgreSQL is not reachable at {SERVER}: {exc}")
        pytest.skip(f"PostgreSQL is not reachable at {SERVER}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    yield f"{SERVER}?options=-csearch_path%3D{schema}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()
