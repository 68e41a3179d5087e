"""The JavaScript decoder (decoders/js, written from docs/wire-format.md alone) against the golden vectors.

It proves the spec complete: a second implementation in another language makes the same JSON of
every vector as the Python decoder. Needs Node.js 20 and npm: skipped without them on a user's
machine, a failure in CI.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.wire import WireError, columnar

REPO = Path(__file__).resolve().parent.parent
JS = REPO / "decoders" / "js"
GOLDEN = REPO / "tests" / "golden" / "wire"
sys.path.insert(0, str(REPO / "bench"))

from make_golden import golden_json  # noqa: E402
from test_wire_v2 import batches  # noqa: E402


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with decoders/js's packages installed (`npm ci`, from package-lock.json)."""
    exe, npm = shutil.which("node"), shutil.which("npm")
    if not (exe and npm):
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but node or npm is missing: the JavaScript decoder cannot be checked")
        pytest.skip("Node.js and npm are not installed: the JavaScript decoder is not checked here")
    if not (JS / "node_modules" / "@msgpack" / "msgpack").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, capture_output=True, timeout=300)
    return exe


def _run(node: str, files: list[Path]) -> list[dict]:
    out = subprocess.run([node, str(JS / "cli.js"), *map(str, files)], capture_output=True, text=True, timeout=60)
    assert out.stderr == ""
    return [json.loads(line) for line in out.stdout.split("\n") if line]  # not splitlines(): U+0085 is in keys


def test_golden_vectors_are_complete():
    names = sorted(p.stem for p in GOLDEN.glob("*.bin"))
    assert len(names) >= 8 and names == sorted(p.stem for p in GOLDEN.glob("*.json"))


def test_js_decoder_makes_the_golden_json_of_every_vector(node):
    files = sorted(GOLDEN.glob("*.bin"))
    decoded = _run(node, files)
    assert len(decoded) == len(files)
    for path, got in zip(files, decoded):
        expected = json.loads(path.with_suffix(".json").read_text())
        assert got == expected, path.name


def test_js_decoder_refuses_malformed_payloads(node, tmp_path):
    good = (GOLDEN / "course_wrap.bin").read_bytes()
    cases = {
        "empty": b"",
        "v1_prefix": b"\x78" + good[1:],
        "truncated": good[:-5],
        "garbage": b"\x02" + os.urandom(64),
        "version_3": columnar.PREFIX + zlib.compress(msgspec.msgpack.encode([3, "d"]), 9, -15),
        "long_column": columnar.PREFIX + zlib.compress(msgspec.msgpack.encode(
            [2, "d", [1, [[[1, 2]], [[1000]], [[1]], [[1]]]]]), 9, -15),
        "bomb": columnar.PREFIX + zlib.compress(b"\x00" * (17 * 1024 * 1024), 9, -15),
    }
    files = []
    for name, payload in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(payload)
        files.append(path)
    results = _run(node, files)
    assert all("error" in r and r["error"].startswith("v2: ") for r in results), results


def _comparable(value):
    """JSON as both languages can write it: no NaN or infinities (JavaScript's JSON.stringify writes null),
    and an integral double past 2**53 written without an exponent by JavaScript read back as a float."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return float(value)
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


@settings(max_examples=int(os.environ.get("HYPOTHESIS_JS_EXAMPLES", "15")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(many=st.lists(batches(), min_size=1, max_size=8))
def test_js_decoder_agrees_with_python_on_random_batches(node, tmp_path, many):
    """Beyond the golden vectors: any batch the encoder writes, the JavaScript decoder reads the same."""
    paths = []
    for i, records in enumerate(many):
        path = tmp_path / f"batch-{i}.bin"
        path.write_bytes(columnar.encode("truck-7", records))
        paths.append(path)
    for path, got in zip(paths, _run(node, paths), strict=True):
        assert _comparable(got) == _comparable(golden_json(path.read_bytes()))


def test_js_decoder_refuses_corrupted_vectors_with_its_own_errors(node, tmp_path):
    """Bit flips, truncations and re-deflated garbage bodies: a decoded batch or a WireError ("v2: ..."),
    never a JavaScript TypeError or RangeError."""
    import random

    rng = random.Random(2)
    files = []
    for n, source in enumerate(sorted(GOLDEN.glob("*.bin")) * 12):
        payload = bytearray(source.read_bytes())
        body = bytearray(zlib.decompress(bytes(payload[1:]), -15))
        choice = n % 3
        if choice == 0 and body:  # a corrupted body, deflated properly
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            payload = bytearray(columnar.PREFIX + zlib.compress(bytes(body), 9, -15))
        elif choice == 1:
            payload[rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
        else:
            payload = payload[: rng.randrange(len(payload))]
        path = tmp_path / f"{n}.bin"
        path.write_bytes(bytes(payload))
        files.append(path)
    results = _run(node, files)
    assert len(results) == len(files)
    for path, result in zip(files, results):
        if "error" in result:
            assert result["error"].startswith("v2: "), (path.name, result["error"])
            continue
        try:
            expected = golden_json(path.read_bytes())
        except WireError as exc:  # the spec lets a decoder read invalid UTF-8 leniently instead of refusing it
            assert "utf-8" in str(exc), (path.name, exc)
            continue
        assert _comparable(result) == _comparable(expected), path.name
