"""``telematics-agent status [--json] [--data-dir D | --config F]``: the running agent at a glance.

Reads ``{data_dir}/status.json``, which the agent rewrites every ``status.interval_s``; a file much
older than that means the agent is not running (or hung), and the output says so first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from agent.cli_base import CommandError
from agent.config import ConfigError, load_config
from agent.ops.status import STATUS_NAME, THROTTLE_BITS
from agent.record import iso_utc

DEFAULT_CONFIG = "/etc/telematics-agent/agent.yaml"
# A status older than this many write intervals is stale: the agent stopped or hangs.
STALE_INTERVALS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data-dir", help="the agent's data directory (default: device.data_dir of --config)")
    where.add_argument("--config", default=DEFAULT_CONFIG, help=f"the agent's config (default {DEFAULT_CONFIG})")


def run(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir) if args.data_dir else _data_dir_from(args.config)
    path = data_dir / f"{STATUS_NAME}.json"
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommandError(f"no status file at {path}: is the agent running? (systemctl status telematics-agent)") from None
    except (OSError, ValueError) as exc:
        raise CommandError(f"cannot read {path}: {exc}") from exc
    now = time.time()
    status["age_s"] = round(now - float(status.get("updated_utc", 0)), 3)
    status["stale"] = status.get("state") != "running" or status["age_s"] > STALE_INTERVALS * float(
        status.get("interval_s", 5)
    )
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(render(status))
    return 1 if status["stale"] else 0


def _data_dir_from(config_path: str) -> Path:
    try:
        return Path(load_config(config_path).device.data_dir)
    except ConfigError as exc:
        raise CommandError(f"{exc} (or name the data directory with --data-dir)") from exc


def _ago(now: float, utc: float | None) -> str:
    if utc is None:
        return "never"
    return f"{_duration(now - utc)} ago"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{sec:02d}s"


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def render(status: dict[str, Any]) -> str:
    """The human-readable view: one line per area, what is wrong first."""
    now = float(status.get("updated_utc") or time.time())
    lines: list[str] = []
    if status["stale"]:
        state = "stopped" if status.get("state") == "stopped" else "not updating (hung or killed?)"
        lines.append(f"WARNING: agent {state}: status is {_duration(status['age_s'])} old")
    lines.append(
        f"telematics-agent {status.get('version', '?')}  device {status.get('device_id', '?')}  "
        f"up {_duration(float(status.get('uptime_s', 0)))}  pid {status.get('pid', '?')}  "
        f"(as of {iso_utc(now, 3)})"
    )
    shown = {"state", "device_id", "version", "pid", "updated_utc", "started_utc", "uptime_s", "interval_s",
             "age_s", "stale"}

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<11}{text}")

    gps = status.get("gps")
    if gps is not None:
        parts = [("fix" if gps.get("fix") else "NO FIX") + (f" {gps['mode']}D" if gps.get("mode") else "")]
        if gps.get("satellites") is not None:
            parts.append(f"{gps['satellites']} satellites")
        if gps.get("state"):
            parts.append(f"receiver {gps['state']}")
        parts.append(f"last fix {_ago(now, gps.get('last_fix_utc'))}")
        row("GPS", ", ".join(parts))
    can = status.get("can")
    if can is not None:
        buses = [(name, bus) for name, bus in sorted(can.items()) if isinstance(bus, dict)]
        for name, bus in buses or [("-", {})]:
            rate = bus.get("frames_per_s")
            text = f"{name}: " + (f"{rate:.0f} frames/s" if rate is not None else f"{bus.get('frames', 0)} frames")
            text += f", {bus.get('errors', bus.get('error_frames', 0))} errors"
            if bus.get("bus_off"):
                text += f", {bus['bus_off']} bus-off"
            row("CAN", text + (f", bus {bus['state']}" if bus.get("state") else ""))
    buffer = status.get("buffer")
    if buffer is not None:
        oldest = buffer.get("oldest_utc")
        age = f"oldest {_duration(now - oldest)} old" if oldest is not None else "empty"
        row("Buffer", f"{buffer.get('depth', 0)} records waiting, {age}")
    broker = status.get("broker")
    if broker is not None:
        link = "connected" if broker.get("connected") else f"NOT CONNECTED ({broker.get('last_error') or broker.get('state')})"
        row("Broker", f"{link}, last publish {_ago(now, broker.get('last_publish_utc'))}")
    versions = []
    if "config" in status:
        versions.append(f"config {status['config'].get('version', '?')}")
    if "geofences" in status:
        fences = status["geofences"]
        versions.append(f"geofences {fences.get('version') or 'none'} ({fences.get('count', 0)} fences)")
    if versions:
        row("Versions", ", ".join(versions))
    clock = status.get("clock")
    if clock is None and gps is not None and "clock_offset_s" in gps:
        clock = {"offset_s": gps["clock_offset_s"], "source": "GPS time"}
    if clock is not None:
        offset = clock.get("offset_s")
        text = f"offset {offset:+.3f} s" if offset is not None else "offset unknown (no GPS time yet)"
        row("Clock", text + (f" against {clock['source']}" if clock.get("source") else ""))
    power = status.get("power")
    if power is not None:
        flags = [name for _, name in sorted(THROTTLE_BITS.items()) if power.get(name)]
        now_bad = [k for k in flags if not k.endswith("_occurred")]
        before = [k.removesuffix("_occurred") for k in flags if k.endswith("_occurred")]
        text = ("NOW: " + ", ".join(now_bad)) if now_bad else "ok"
        if before:
            text += "; since boot: " + ", ".join(before)
        row("Power", text + (f" (get_throttled {power['get_throttled']})" if "get_throttled" in power else ""))
    ignition = status.get("ignition")
    if ignition is not None:
        run_on = (status.get("power_state") or {}).get("state")
        row("Ignition", ("on" if ignition.get("on") else "off") + f" since {_ago(now, ignition.get('since_utc'))}"
            + (f" (power {run_on})" if run_on else ""))
    counters = dict(status.get("counters") or {})
    if buffer is not None and "dropped_total" in buffer:
        counters.setdefault("dropped_by_buffer", buffer["dropped_total"])
    if counters:
        row("Records", ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
    shown |= {"gps", "can", "buffer", "broker", "config", "geofences", "clock", "power", "ignition", "counters"}
    if ignition is not None:
        shown.add("power_state")
    for name in sorted(set(status) - shown):
        value = status[name]
        text = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
        row(name.capitalize(), text)
    return "\n".join(lines)
