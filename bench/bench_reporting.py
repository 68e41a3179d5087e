"""Adaptive reporting fidelity on real drives (issue 7: <= 10 m at the 99th percentile while
reporting <= 20 % of the fixes) and its cost per fix.

For every fix of the full track (after the agent's fix filter), the distance between it and the
position interpolated linearly in time between the reported fixes around it.

    .venv/bin/python bench/bench_reporting.py [--config FILE] [NMEA ...]   (default: ../shared/corpus/drives/*)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from agent.config import Config, DeviceConfig, load_config
from agent.decode.nmea import decode_file
from agent.processors.fix_filter import FixFilter
from agent.processors.reporting import AdaptiveReporter, fidelity_errors_m
from agent.record import Record

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "drives"


def measure(path: Path, config: Config) -> dict:
    """Track, reported fixes, error percentiles and cost of one capture."""
    fix_filter = FixFilter(config.gps.filter)
    track = [r for r in (Record(utc=u, mono=u, data=f) for u, f in decode_file(path)) if fix_filter.accept(r)]
    reporter = AdaptiveReporter(config.edge.reporting)
    reported, costs = [], []
    for record in track:
        start = time.perf_counter()
        out = reporter.process(record)
        costs.append(time.perf_counter() - start)
        reported += out
    reported += reporter.flush()
    errors = sorted(fidelity_errors_m(track, reported))
    q = statistics.quantiles(errors, n=100)
    return {
        "fixes": len(track), "reported": len(reported), "share": len(reported) / len(track),
        "p50_m": statistics.median(errors), "p99_m": q[98], "max_m": errors[-1],
        "cost_us": statistics.median(costs) * 1e6, "cost_p99_us": statistics.quantiles(costs, n=100)[98] * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--config", help="an agent config (its gps.filter and edge.reporting)")
    args = parser.parse_args()
    config = load_config(args.config) if args.config else Config(device=DeviceConfig(id="bench"))
    files = args.files or sorted(CORPUS.glob("*"))
    for path in files:
        m = measure(path, config)
        print(f"{path.name}: {m['fixes']} fixes, reported {m['reported']} ({m['share']:.1%}); error p50 "
              f"{m['p50_m']:.2f} m, p99 {m['p99_m']:.2f} m, max {m['max_m']:.1f} m; "
              f"cost median {m['cost_us']:.1f} us, p99 {m['cost_p99_us']:.1f} us per fix")


if __name__ == "__main__":
    main()
