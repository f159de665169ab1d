"""A one-line progress bar on stderr for long work (a long prefill: layers x chunks), no dependency."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``label [##########..........] 12/40 chunks 3.1 s``, redrawn in place on a terminal at most every
    ``interval`` seconds; elsewhere (a log) one line every ``log_interval`` seconds and the last one.

    ``update(done, total)`` has the signature of convert()'s ``progress=`` callback; it draws only
    between ``start()`` and ``finish()``, so warm-up calls through the same callback stay silent.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 30, interval: float = 0.2,
                 log_interval: float = 10.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else log_interval
        self.label, self.unit = "", ""
        self.active = False
        self.t0 = self.last_draw = 0.0
        self.drawn = False

    def start(self, label: str, unit: str = "chunks") -> None:
        self.label, self.unit, self.active, self.drawn = label, unit, True, False
        self.t0 = self.last_draw = time.perf_counter()

    def update(self, done: int, total: int) -> None:
        if not self.active or total <= 0:
            return
        now = time.perf_counter()
        if done < total and now - self.last_draw < self.interval:
            return
        self.last_draw = now
        filled = min(self.width, self.width * done // total)
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {self.unit} "
                f"{now - self.t0:.1f} s")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.active and self.drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.active = False
