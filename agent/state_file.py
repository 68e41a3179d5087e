"""Small state that must survive a restart, as a JSON file: a processor inside a fence or a stop,
remote settings, the status board.

Written atomically (temp file, fsync, rename, fsync of the directory) and only when the state
changed, so a power cut leaves either the old or the new state, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# State that changes with every record (a trip's distance, fuel while idling) is saved at most this
# often, in seconds of record time: a restart loses at most this much of it, and the card is spared.
PERIODIC_SAVE_S = 60.0


class StateFile:
    """``<data_dir>/<name>.json``; ``None`` as data_dir keeps state in memory only (offline runs)."""

    def __init__(self, data_dir: str | Path | None, name: str) -> None:
        self.path = Path(data_dir) / f"{name}.json" if data_dir is not None else None
        self._last: str | None = None

    def load(self) -> dict[str, Any]:
        """The saved state, or {} when there is none or it cannot be read (logged)."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            text = self.path.read_text(encoding="utf-8")
            state = json.loads(text)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return {}
        if not isinstance(state, dict):
            log.warning("ignoring state file %s: not a JSON object", self.path)
            return {}
        self._last = json.dumps(state, sort_keys=True)
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` if it differs from what is on disk."""
        text = json.dumps(state, sort_keys=True)
        if text == self._last:
            return
        self._last = text
        if self.path is None:
            return
        write_atomically(self.path, text.encode("utf-8"))


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file: fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must be durable
    finally:
        os.close(dir_fd)
