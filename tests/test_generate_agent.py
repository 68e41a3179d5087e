"""The acceptance harness of the edge logic (issue 9): generated drives of different shapes through
``telematics-agent process``; every event of the ground truth reported once within its window, no
event the truth does not expect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.record import parse_iso_utc
from sim import generate

TOOLS = Path(sys.executable).parent
DELFT_NORTH = [(52.006, 4.3475), (52.006, 4.353), (52.0082, 4.3533), (52.0083, 4.36), (52.0105, 4.3603)]
MUNICH = [(48.1351, 11.5820), (48.1395, 11.5826), (48.1398, 11.5920), (48.1440, 11.5927), (48.1444, 11.6010)]


def _gate_drive() -> generate.Plan:
    plan = generate.default_plan()
    plan.gate = (0.75, 90.0)  # waits on the yard's edge: no flapping, one enter when it drives in
    return plan


def _dropout_drive() -> generate.Plan:
    plan = generate.default_plan()
    plan.dropouts = [(0.2, 4.0), (0.55, 25.0)]
    return plan


CASES = {
    "delft-gate": (DELFT_NORTH, _gate_drive, 2),
    "munich-dropouts": (MUNICH, _dropout_drive, 5),
    "munich-seed-9": (MUNICH, generate.default_plan, 9),
}


def match(truth: dict, records: list[dict], with_can: bool) -> list[str]:
    """What differs between the truth and the agent's events, as readable lines (empty: all good)."""
    problems = []
    got = [r for r in records if r["kind"] == "event"]
    unmatched = list(got)
    for want in truth["events"]:
        if "can" in want["needs"] and not with_can:
            continue
        lo, hi = (parse_iso_utc(t) for t in want["window"])
        hits = [e for e in unmatched if e["type"] == want["type"] and e.get("geofence_id") == want.get("geofence_id")
                and lo - 0.5 <= parse_iso_utc(e["time"]) <= hi + 0.5]
        if len(hits) != 1:
            problems.append(f"expected once, got {len(hits)}: {want['type']} {want.get('geofence_id') or ''} "
                            f"at {want['time']} (window {want['window'][0]} .. {want['window'][1]})")
            continue
        for key, tolerance in want.get("tolerance", {}).items():
            if tolerance is not None and abs(hits[0][key] - want[key]) > tolerance:
                problems.append(f"{want['type']} at {want['time']}: {key} {hits[0][key]} but {want[key]} +- {tolerance}")
        unmatched.remove(hits[0])
    problems += [f"unexpected: {e['type']} {e.get('geofence_id') or ''} at {e['time']}"
                 for e in unmatched if e["type"] not in truth["unchecked_types"]]
    return problems


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_drive_through_process_matches_its_truth(case, tmp_path):
    waypoints, plan, seed = CASES[case]
    paths = generate.write(generate.build(waypoints, plan(), seed=seed), tmp_path, case)
    truth = json.loads(paths["truth"].read_text())
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"device": {"id": "harness"}, "edge": truth["edge_settings"]}))
    result = subprocess.run(
        [str(TOOLS / "telematics-agent"), "process", "--nmea", str(paths["nmea"]), "--can", str(paths["can"]),
         "--geofences", str(paths["geofences"]), "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert match(truth, records, with_can=True) == []


def test_the_harness_reports_a_broken_expectation_readably(tmp_path):
    truth = {"events": [{"type": "stop_arrive", "time": "2026-03-02T08:31:00.000Z", "needs": [],
                         "window": ["2026-03-02T08:30:58.000Z", "2026-03-02T08:31:02.000Z"]}], "unchecked_types": []}
    records = [{"kind": "event", "type": "stop_arrive", "time": "2026-03-02T08:31:09.000Z"}]
    assert match(truth, records, with_can=False) == [
        "expected once, got 0: stop_arrive  at 2026-03-02T08:31:00.000Z (window 2026-03-02T08:30:58.000Z .. 2026-03-02T08:31:02.000Z)",
        "unexpected: stop_arrive  at 2026-03-02T08:31:09.000Z",
    ]
