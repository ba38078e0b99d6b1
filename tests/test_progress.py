"""The progress line: redrawn at a terminal, a few lines (only on change) in a log."""

from __future__ import annotations

import io

from streamguard.progress import ProgressLine


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_it_prints_a_few_lines_and_only_on_change() -> None:
    out = io.StringIO()
    line = ProgressLine("processed", 1000, stream=out)
    for _ in range(50):  # a polling loop that sees the same count many times
        line.update(0)
    for done in range(0, 1001, 7):
        line.update(done)
    line.update(1000)
    line.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "processed 0/1,000" and lines[-1] == "processed 1,000/1,000"
    assert len(lines) <= 12  # every 10 %, not hundreds of repeats
    assert len(lines) == len(set(lines))


def test_at_a_terminal_it_redraws_one_line() -> None:
    out = _Terminal()
    line = ProgressLine("produced", 3, stream=out)
    for done in (1, 1, 2, 3):
        line.update(done)
    line.close()
    assert out.getvalue() == "\rproduced 1/3\rproduced 2/3\rproduced 3/3\n"
