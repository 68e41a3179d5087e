"""firmware_config/agent.example.yaml lists every key of the schema with its default and a comment.

The comparison is against agent/config.py itself, so a section added to the schema without the
example (or a default changed in one place only) fails here, naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import yaml

from agent.config import parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "firmware_config" / "agent.example.yaml"


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def test_the_example_loads():
    parse_config(EXAMPLE.read_text(), source=str(EXAMPLE))


def test_every_key_of_the_schema_is_in_the_example_with_its_default():
    raw = yaml.safe_load(EXAMPLE.read_text())
    # The schema's defaults, with the one required key (device.id) taken from the example.
    defaults = msgspec.to_builtins(parse_config(yaml.safe_dump({"device": {"id": raw["device"]["id"]}})))
    # YAML reads 2025-01-01 as a date; compare in the builtin (JSON-like) form on both sides.
    want, have = _flatten(defaults), _flatten(msgspec.to_builtins(raw))
    missing = sorted(set(want) - set(have))
    unknown = sorted(set(have) - set(want))
    different = sorted(f"{k}: example {have[k]!r}, schema {want[k]!r}" for k in set(want) & set(have) if have[k] != want[k])
    assert not missing, f"keys of agent/config.py missing from {EXAMPLE.name}: {missing}"
    assert not unknown, f"keys in {EXAMPLE.name} that agent/config.py does not have: {unknown}"
    assert not different, f"defaults differ: {different}"


KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[a-z_0-9]+):")


def test_every_key_has_a_comment():
    lines = EXAMPLE.read_text().splitlines()
    uncommented = []
    for number, line in enumerate(lines):
        if not KEY_LINE.match(line):
            continue
        above = lines[number - 1].strip() if number else ""
        if " # " not in line and not above.startswith("#"):
            uncommented.append(f"line {number + 1}: {line.strip()}")
    assert not uncommented, "keys without a comment:\n" + "\n".join(uncommented)
