"""An slcan adapter on a pty, in its own process, for the CAN tests (run: python tests/can_slcan_emulator.py).

Each round plugs the adapter in (a new pty behind the symlink LINK), waits until the host opens
the channel, reports how it was opened, delivers every frame of the capture, and then waits for a
line on stdin before it unplugs (closes the pty and removes the link). Output lines, for the test:
``open listen_only=True bitrate=250`` and ``sent 1815``. With ``--bitrate-kbit`` frames flow only
while the host has the adapter at that rate, as on a real bus.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import can

from agent.decode.can_log import iter_frames
from sim.slcan_adapter import SlcanAdapter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--link", required=True)
    parser.add_argument("--capture", required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="deliver the capture this many times per round")
    parser.add_argument("--bitrate-kbit", type=int, default=None,
                        help="the bus's bit rate: frames reach the host only when the adapter is set to it")
    args = parser.parse_args()
    frames = [can.Message(arbitration_id=f.id, is_extended_id=f.extended, data=f.data)
              for f in iter_frames(args.capture) if not f.error and not f.remote]
    for _ in range(args.rounds):
        adapter = SlcanAdapter()
        path = adapter.open_pty()
        os.symlink(path, args.link)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                adapter.is_open and args.bitrate_kbit in (None, adapter.bitrate_kbit)):
            time.sleep(0.01)
        print(f"open listen_only={adapter.listen_only} bitrate={adapter.bitrate_kbit}", flush=True)
        sent = 0
        for _ in range(args.repeat):
            for msg in frames:
                # The pty holds a few kB: wait for the host to read rather than drop (an adapter would overrun).
                while not adapter.deliver(msg):
                    time.sleep(0.0005)
                sent += 1
        print(f"sent {sent}", flush=True)
        sys.stdin.readline()
        os.unlink(args.link)
        adapter.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
