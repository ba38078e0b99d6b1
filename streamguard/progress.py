"""A progress line that suits where it is written: redrawn in a terminal, a few lines in a log.

A carriage-return line is right for a person at a terminal; in CI or a log file every redraw is a
new line, so there it prints only when the count changed and moved by another `log_step` share of
the total (and once at the end).
"""

from __future__ import annotations

import sys
from typing import TextIO


class ProgressLine:
    """`update(done)` as often as you like; `close()` ends the line."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        log_step: float = 0.1,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        self.step = max(1, int(total * log_step))
        self._shown: int | None = None
        self._drawn = False

    def _text(self, done: int) -> str:
        return f"{self.label} {done:,}/{self.total:,}"

    def update(self, done: int) -> None:
        if done == self._shown:
            return
        if self.interactive:
            self.stream.write("\r" + self._text(done))
            self._drawn = True
        elif self._shown is None or done >= self.total or done - self._shown >= self.step:
            self.stream.write(self._text(done) + "\n")
        else:
            return
        self._shown = done
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
