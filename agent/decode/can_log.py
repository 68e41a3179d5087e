"""CAN capture files as a stream of :class:`Frame`: python-can's log formats plus plain candump screen output.

python-can reads candump ``-L`` logs (``.log``), Vector ``.asc``, ``.blf``, ``.trc`` and its own
``.csv``. A technician's ``candump can0 > file`` is a different text format (no timestamps unless
``-t`` was given) that no python-can reader understands; it is parsed here:

    can0  18FEF100   [8]  FF FF 00 00 FF FF FF FF
    (1622547830.084000)  can0  18FEF100   [8]  FF FF 00 00 FF FF FF FF      (candump -ta)
    can0  123   [2]  remote request

Vector ASC files may also hold lines that CANalyzer reassembled itself (``J1939TP FEE3p ...``);
python-can skips them, so they are yielded here as frames with ``reassembled_pgn`` set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, NamedTuple


class Frame(NamedTuple):
    """One CAN frame of a capture; ``time`` is epoch seconds (or the capture's own zero), None if unknown."""

    time: float | None
    bus: str | None
    id: int
    extended: bool
    data: bytes
    error: bool = False
    remote: bool = False
    reassembled_pgn: int | None = None  # a message the logging tool reassembled (ASC J1939TP lines)
    sa: int | None = None  # its source address


class CaptureError(Exception):
    """The file cannot be read as a CAN capture (unknown format, unreadable, not CAN at all)."""


# candump screen output: optional "(time)" or "time", interface, id, [dlc], data or "remote request".
_SCREEN = re.compile(
    r"^\s*(?:\((?P<t>\d+\.\d+)\)\s+)?(?P<bus>[\w.-]+)\s+(?P<id>[0-9A-Fa-f]{1,8})\s+\[(?P<dlc>\d+)\]\s*"
    r"(?P<rest>.*?)\s*$"
)
_CANUTILS = re.compile(r"^\s*\(\d+\.\d+\)\s+\S+\s+[0-9A-Fa-f]+#")
# Vector ASC "J1939TP <pgn>p <prio> <sa> <da> - Rx d <len> <bytes...>"
_ASC_TP = re.compile(
    r"^\s*(?P<t>\d+\.\d+)\s+(?P<ch>\d+)\s+J1939TP\s+(?P<pgn>[0-9A-Fa-f]+)p\s+\d+\s+(?P<sa>[0-9A-Fa-f]+)\s+"
    r"(?P<da>[0-9A-Fa-f]+)\s+\S+\s+(?:Rx|Tx)\s+d\s+(?P<len>\d+)\s+(?P<data>(?:[0-9A-Fa-f]{2}\s*)+)"
)


def iter_frames(path: str | Path) -> Iterator[Frame]:
    """Every frame of the capture at ``path``, in file order. Raises :class:`CaptureError`."""
    path = Path(path)
    try:
        with path.open("rb") as probe:
            head = probe.read(4096)
    except OSError as exc:
        raise CaptureError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    suffix = path.suffix.lower()
    if suffix in (".log", ".txt", "") or suffix not in (".asc", ".blf", ".trc", ".csv", ".mf4"):
        text = head.decode("ascii", "replace")
        first = next((line for line in text.splitlines() if line.strip()), "")
        if _SCREEN.match(first) and not _CANUTILS.match(first):
            yield from _screen_frames(path)
            return
        if not _CANUTILS.match(first):
            raise CaptureError(f"{path}: not a CAN capture python-can or candump can read (first line: {first[:60]!r})")
        suffix = ".log"
    yield from _python_can_frames(path, suffix)


def _python_can_frames(path: Path, suffix: str) -> Iterator[Frame]:
    import can  # imported here: a second of start-up on a Pi, only for commands that read captures

    readers = {".log": can.CanutilsLogReader, ".asc": can.ASCReader, ".blf": can.BLFReader,
               ".trc": can.TRCReader, ".csv": can.CSVReader, ".mf4": can.MF4Reader}
    reader_class = readers.get(suffix)
    if reader_class is None:
        raise CaptureError(f"{path}: unknown capture format {suffix!r}")
    tp_lines = list(_asc_tp_frames(path)) if suffix == ".asc" else []
    try:
        # ASC files state their start date: read absolute times, as every other format has them.
        reader = reader_class(str(path), relative_timestamp=False) if suffix == ".asc" else reader_class(str(path))
        frames = (_from_message(msg) for msg in reader)
        if tp_lines:
            # Merge CANalyzer's reassembled lines (relative times) in time order with the frames around them.
            listed = list(frames)
            start = reader.start_time
            tp_lines = [f._replace(time=f.time + start) for f in tp_lines]
            frames = iter(sorted([*listed, *tp_lines], key=lambda f: f.time))
        yield from frames
    except (ValueError, IndexError, OSError, EOFError) as exc:
        raise CaptureError(f"{path}: not a valid {suffix} capture: {exc}") from exc


def _from_message(msg) -> Frame:
    channel = msg.channel
    return Frame(
        time=msg.timestamp,
        bus=None if channel is None else str(channel),
        id=msg.arbitration_id,
        extended=msg.is_extended_id,
        data=bytes(msg.data),
        error=msg.is_error_frame,
        remote=msg.is_remote_frame,
    )


def _asc_tp_frames(path: Path) -> Iterator[Frame]:
    with path.open("r", encoding="ascii", errors="replace") as lines:
        for line in lines:
            match = _ASC_TP.match(line)
            if match:
                size = int(match.group("len"))
                data = bytes.fromhex(match.group("data").replace(" ", ""))[:size]
                pgn = int(match.group("pgn"), 16)
                yield Frame(float(match.group("t")), str(int(match.group("ch")) - 1), pgn, True, data,
                            reassembled_pgn=pgn, sa=int(match.group("sa"), 16))


def _screen_frames(path: Path) -> Iterator[Frame]:
    with path.open("r", encoding="ascii", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            match = _SCREEN.match(line)
            if match is None:
                raise CaptureError(f"{path}:{number}: not a candump line: {line.strip()[:60]!r}")
            ident = match.group("id")
            rest = match.group("rest")
            remote = rest.startswith("remote")
            try:
                data = b"" if remote else bytes.fromhex(rest.split("'")[0])
            except ValueError as exc:
                raise CaptureError(f"{path}:{number}: bad data bytes: {rest[:40]!r}") from exc
            t = match.group("t")
            yield Frame(
                time=float(t) if t else None,
                bus=match.group("bus"),
                id=int(ident, 16),
                extended=len(ident) > 3,
                data=data,
                remote=remote,
            )
