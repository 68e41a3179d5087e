"""The boundaries between the pipeline's stages.

Sources run each in its own thread and hand records to :meth:`Pipeline.emit`; one pipeline thread
runs the processors in order (so processors need no locks) and appends what comes out to the
durable buffer; the publisher, in its own thread, takes batches from the buffer.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterable, Protocol

from agent.record import Record

log = logging.getLogger(__name__)

Emit = Callable[[Record], None]


class Source(Protocol):
    """Something that produces records from a device. Opens its device in ``run``, never in ``__init__``."""

    name: str

    def run(self, emit: Emit, stop: threading.Event) -> None:
        """Produce records until ``stop`` is set; survive the device going away and coming back."""


class Processor(Protocol):
    """A step between sources and the buffer; runs only in the pipeline thread."""

    def process(self, record: Record) -> Iterable[Record]:
        """Return the records to pass on: the input, derived records, or nothing (thinned)."""


class RecordSink(Protocol):
    """Where the pipeline puts what it accepted (the durable buffer)."""

    def append(self, records: list[Record]) -> None: ...


class Pipeline:
    """Bounded hand-off from source threads to processors and the buffer, drained in batches."""

    def __init__(
        self,
        processors: list[Processor],
        sink: RecordSink,
        queue_size: int = 4096,
        on_turn: Callable[[], None] | None = None,
    ) -> None:
        self._processors = processors
        self._sink = sink
        # Called every turn of the loop (at least every 0.1 s): the watchdog's proof of life.
        self._on_turn = on_turn or (lambda: None)
        self._queue: queue.Queue[Record] = queue.Queue(maxsize=queue_size)
        self.dropped = 0

    def emit(self, record: Record) -> None:
        """Called from source threads. Blocks briefly when the pipeline is behind, never forever."""
        try:
            self._queue.put(record, timeout=1.0)
        except queue.Full:
            self.dropped += 1
            log.warning("pipeline queue full: dropped a %s record (%d so far)", record.kind, self.dropped)

    def run(self, stop: threading.Event) -> None:
        """Drain the queue in batches until ``stop`` is set and the queue is empty."""
        while not (stop.is_set() and self._queue.empty()):
            self._on_turn()
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < 1024:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._sink.append(self.process_all(batch))

    def process_all(self, records: Iterable[Record]) -> list[Record]:
        """Run every processor over ``records`` in order; used live and by offline processing."""
        current = list(records)
        for processor in self._processors:
            current = [out for record in current for out in processor.process(record)]
        return current
