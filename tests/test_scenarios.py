"""``telematics-sim run``: every shipped scenario passes through a real Mosquitto, agent process and
collector, and a deliberately broken expectation fails with a readable difference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode.nmea import NmeaDecoder, checksum
from conftest import REPO
from sim.scenario import corrupt_checksum, load_scenario

SCENARIOS = REPO / "scenarios"
TOOL = Path(sys.executable).parent / "telematics-sim"
# Each takes 15-25 s of wall time; the default run keeps one, the rest run with -m slow.
FAST = {"garbage_and_checksums"}
DRIVE = REPO / "sim" / "drives" / "delivery_route.nmea"


def sim_run(path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOL), "run", str(path), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", [
    pytest.param(p.stem, marks=() if p.stem in FAST else pytest.mark.slow) for p in sorted(SCENARIOS.glob("*.yaml"))
])
def test_shipped_scenario_passes(name, tmp_path):
    result = sim_run(SCENARIOS / f"{name}.yaml", "--workdir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "run" / "agent.log").read_text()[-3000:]
    assert result.stdout.rstrip().endswith("verdict: PASS")


def test_the_shipped_scenarios_cover_every_fault_and_load():
    kinds = set()
    for path in SCENARIOS.glob("*.yaml"):
        scenario, _ = load_scenario(path)
        kinds |= {fault.kind for fault in scenario.faults}
    assert kinds == {"serial_unplug", "garbage", "checksum_errors", "can_adapter_loss", "broker_down", "agent_kill",
                     "clock_step"}


def test_a_broken_expectation_fails_with_a_readable_difference(tmp_path):
    scenario = {
        "name": "broken", "inputs": {"nmea": str(DRIVE)}, "speed": 30, "end_s": 60,
        "agent": {"config": {"edge": {"reporting": {"enabled": False}}}},
        "expect": {"fixes": {"min": 1000}, "events": [{"type": "harsh_brake", "at": 10, "tolerance_s": 1}]},
    }
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(scenario))
    result = sim_run(path)
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert "  ok    all fixes: 61 good fixes were read by the agent, 61 stored, 0 lost" in out
    assert "  FAIL  fixes count: 61 fixes stored, at least 1000 wanted" in out
    assert "  FAIL  events: 1 events wanted" in out
    assert "missing harsh_brake at " in out and "±1.0 s; no harsh_brake at all" in out
    assert out.rstrip().endswith("verdict: FAIL (2 of 4 expectations not met)")


@pytest.mark.parametrize("text, problem", [
    ("name: x\ninputs: {nmea: nowhere.nmea}\n", "inputs.nmea"),
    (f"name: x\ninputs: {{nmea: {DRIVE}}}\nfaults: [{{at: 1, kind: meteor}}]\n", "meteor"),
    (f"name: x\ninputs: {{nmea: {DRIVE}}}\nexpect: {{typo: 1}}\n", "unknown field `typo`"),
    (f"name: x\ninputs: {{nmea: {DRIVE}}}\nfaults: [{{at: 900, kind: agent_kill}}]\n", "outside the drive played"),
])
def test_a_bad_scenario_is_one_line_and_exit_2(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = sim_run(path)
    assert result.returncode == 2
    assert problem in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=70).map(lambda b: bytes(c for c in b if 0x20 <= c < 0x7F and c not in b"$*!\\")),
       st.sampled_from([b"\r\n", b"\n"]))
def test_a_corrupted_checksum_is_one_character_changed_and_rejected(body, ending):
    body = b"GPRMC," + body
    good = b"$%s*%02X%s" % (body, checksum(body), ending)
    bad = corrupt_checksum(good)
    assert len(bad) == len(good) and sum(a != b for a, b in zip(good, bad)) == 1 and bad.endswith(ending)
    for line, bad_count in ((good, 0), (bad, 1)):
        decoder = NmeaDecoder()
        decoder.feed(line)
        assert decoder.counters["bad_checksum"] == bad_count


def test_corpus_nmea_and_can_through_pty_and_slcan_give_what_process_gives(corpus, tmp_path):
    """Issue 9's check on real captures: a gpsd regression log through the pty and a real J1939 truck's
    bus through the emulated slcan adapter into a running agent store what ``process`` prints for the
    same bytes with the same config (change-sampled signals: the same values in the same order)."""
    scenario = {
        "name": "corpus_replay",
        "inputs": {"nmea": str(corpus / "nmea" / "bundg_zeus_9.log"),
                   "can": str(corpus / "can" / "css_FCBF0606_j1939_truck.derived.candump.log")},
        "agent": {"config": {"edge": {"reporting": {"enabled": False}}, "can": {"signals": [
            {"signal": name, "policy": "change"}
            for name in ("EngineSpeed", "EngineOilTemperature1", "EngineFuelTemperature1", "EngineCoolantTemperature")]}}},
        "speed": 20,
        "expect": {"same_as_process": True, "signals": {"min": 8}},
    }
    path = tmp_path / "corpus.yaml"
    path.write_text(yaml.safe_dump(scenario))
    result = sim_run(path, "--workdir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "  ok    same as process: compared 148 fixes" in result.stdout
    assert "1333 CAN frames sent, 0 not delivered" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("capture", ["haicom-305N.log", "meinberg-gps164.log", "nmea-rtk.log", "ublox-8.log"])
def test_more_corpus_receivers_through_the_pty_give_what_process_gives(corpus, tmp_path, capture):
    """The same check over other real receivers of the gpsd corpus: each fix (and event) equal to process's,
    none lost to the live path."""
    scenario = {"name": capture, "inputs": {"nmea": str(corpus / "nmea" / capture)}, "speed": 20,
                "agent": {"config": {"edge": {"reporting": {"enabled": False}}}},
                "expect": {"same_as_process": True, "fixes": {"min": 50}}}
    path = tmp_path / "corpus.yaml"
    path.write_text(yaml.safe_dump(scenario))
    result = sim_run(path, "--workdir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_a_real_obd2_session_through_slcan_gives_what_process_gives(corpus, tmp_path):
    """The OBD-II capture (a tester's requests and the car's answers, heard listen-only) through the
    emulated adapter, with the Munich drive as the GPS: the answered PIDs decode live as offline."""
    scenario = {
        "name": "obd2_session", "speed": 20, "end_s": 300,
        "inputs": {"nmea": str(corpus / "drives" / "genivi_munich-gps.nmea"),
                   "can": str(corpus / "can" / "css_7512BE4D_obd2_session.derived_bus1.candump.log")},
        "agent": {"config": {"edge": {"reporting": {"enabled": False}}, "can": {
            "buses": [{"protocol": "obd2", "bitrate": 500000}],
            "signals": [{"signal": "EngineRPM", "policy": "change"}, {"signal": "VehicleSpeed", "policy": "change"}]}}},
        "expect": {"same_as_process": True, "signals": {"min": 5}, "signal_names": ["EngineRPM", "VehicleSpeed"]},
    }
    path = tmp_path / "obd.yaml"
    path.write_text(yaml.safe_dump(scenario))
    result = sim_run(path, "--workdir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert ", 0 not delivered" in result.stdout
