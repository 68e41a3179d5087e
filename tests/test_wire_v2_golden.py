"""The golden vectors of wire format v2 (tests/golden/wire): the Python decoder and encoder agree with them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.wire import decode_batch

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "wire"
sys.path.insert(0, str(REPO / "bench"))

from make_golden import golden_json  # noqa: E402


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.bin")), ids=lambda p: p.stem)
def test_python_decoder_makes_the_golden_json(path):
    assert golden_json(path.read_bytes()) == json.loads(path.with_suffix(".json").read_text())
    assert decode_batch(path.read_bytes()).version == 2


def test_the_encoder_still_writes_the_golden_bytes():
    """A change of the encoder's choices shows up here; regenerate with bench/make_golden.py on purpose."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "make_golden.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
