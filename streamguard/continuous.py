"""Continuous mode: one long-running worker that scores a stream as its records arrive.

The worker is the micro-batch runner called batch after batch (`MicroBatchRunner.recover`, then
`step` until asked to stop), so every batch is planned, written and committed on the one commit
path with the same exactly-once guarantee as a sensor-launched run; this module only decides when
to poll, when to stop, when to compact and what to report. A read that finds nothing writes
nothing (the runner plans no batch), and the worker waits `idle_wait_s` before the next poll.
Kinesis is read through `streamguard.kinesis_tail.KinesisTailSource`, which reads ahead while a
batch is being written; the worker's tables are compacted on a thread of their own (`Compactor`).

Stopping: a `StopRequest` (set by SIGINT/SIGTERM through `stop_on_signals`, by Dagster's run
termination, or by a caller) is looked at between batches only, so the batch in hand is finished
and committed first. A process killed at any point (kill -9, OOM) loses nothing either: the next
worker replays the last planned but uncommitted batch over its recorded range before going on.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

from streamguard.checkpoint import CHECKPOINT_TABLE
from streamguard.commit import DEAD_LETTER_TABLE
from streamguard.lake import Lake
from streamguard.runner import BatchReport, MicroBatchRunner

log = logging.getLogger(__name__)

# The pause after a poll that found nothing (a busy stream is read back to back). With Kinesis
# the poll reads the tail source's buffer, and the stream itself is polled at its own pace
# (`streamguard.kinesis_tail`); with Kafka it asks the brokers for each partition's end.
DEFAULT_IDLE_WAIT_S = 0.05
DEFAULT_MAX_BATCH_RECORDS = 10_000
DEFAULT_COMPACT_MIN_FILES = 64
DEFAULT_COMPACT_EVERY_S = 2.0
DEFAULT_REPORT_EVERY_S = 60.0


def idle_wait_for(source: str, poll_interval_s: float) -> float:
    """The loop's pause after an empty poll for a source polled every `poll_interval_s`.

    Kinesis: the poll reads `KinesisTailSource`'s buffer, which reads the stream itself every
    `poll_interval_s`, so the loop looks again soon (at no cost to the stream). Kafka: the poll
    asks the brokers, so it waits the interval.
    """
    return min(poll_interval_s, DEFAULT_IDLE_WAIT_S) if source == "kinesis" else poll_interval_s


class StopRequest:
    """A request, from outside the loop, to stop after the batch in hand (thread-safe)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        """Ask the loop to stop; the first reason given is the one reported."""
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking as soon as a stop is requested; whether one was."""
        return self._event.wait(seconds)


@contextmanager
def stop_on_signals(
    stop: StopRequest, signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM)
) -> Iterator[StopRequest]:
    """While inside, the first SIGINT/SIGTERM requests a stop between batches instead of
    interrupting a batch half-written; a second one raises KeyboardInterrupt (stop now: the
    next start replays that batch). Handlers are restored on exit.

    Signals reach only the main thread: elsewhere this changes nothing, and the caller must set
    `stop` itself.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            raise KeyboardInterrupt(name)
        log.warning("%s received: stopping after the current batch", name)
        stop.set(name)

    previous = {s: signal.getsignal(s) for s in signals}
    try:
        for s in signals:
            signal.signal(s, handler)
        yield stop
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@dataclass(frozen=True)
class ContinuousSettings:
    """How the worker polls, compacts and reports (the batch size is the runner's)."""

    idle_wait_s: float = DEFAULT_IDLE_WAIT_S
    # Every compact_every_s, on a thread beside the scoring (`Compactor`), the worker's append
    # table with the most files is compacted once it has compact_min_files: a batch every few
    # hundred milliseconds otherwise leaves thousands of small files per table an hour, and every
    # commit and read of the table slows down. 0 turns it off (then the nightly compaction job is
    # the only one).
    compact_every_s: float = DEFAULT_COMPACT_EVERY_S
    compact_min_files: int = DEFAULT_COMPACT_MIN_FILES
    report_every_s: float = DEFAULT_REPORT_EVERY_S
    # How often `should_stop` (e.g. a look at the Dagster run's status) is asked.
    check_every_s: float = 2.0

    def __post_init__(self) -> None:
        if self.idle_wait_s < 0 or self.compact_every_s < 0:
            raise ValueError("idle_wait_s and compact_every_s must be >= 0")
        if self.report_every_s <= 0 or self.check_every_s <= 0:
            raise ValueError("report_every_s and check_every_s must be > 0")


@dataclass
class ContinuousReport:
    """What a worker did so far: counts only, so a worker running for weeks stays small."""

    job: str
    batches: int = 0
    records: int = 0
    rejected: int = 0
    replayed: int = 0
    idle_polls: int = 0
    compactions: int = 0
    log_checkpoints: int = 0
    rows: Counter[str] = field(default_factory=Counter)
    batch_seconds_max: float = 0.0
    stop_reason: str = ""
    positions: dict[str, str | None] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def add(self, batch: BatchReport) -> None:
        self.batches += 1
        self.records += batch.n_records
        self.rejected += batch.n_rejected
        self.replayed += int(batch.replayed)
        self.rows.update(batch.rows_written)
        self.batch_seconds_max = max(self.batch_seconds_max, batch.seconds)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        elapsed = time.monotonic() - self.started
        return (
            f"{self.job}: {self.batches:,} batch(es), {self.records:,} records "
            f"({self.records / max(elapsed, 1e-9):,.0f}/s over {elapsed:,.0f}s), "
            f"{self.rows.get('alerts', 0):,} alerts, {self.rejected:,} dead-lettered, "
            f"{self.replayed} replayed, {self.idle_polls:,} idle polls, "
            f"{self.compactions} compaction(s), slowest batch {self.batch_seconds_max:.2f}s"
        )


class Compactor:
    """Compacts the worker's append-only tables, the fullest first, and writes the Delta log
    checkpoints of all its tables, on a thread of its own with a `Lake` of its own.

    A batch every few hundred milliseconds leaves thousands of small files per table an hour,
    and every commit and read of a table slows down with its files. Compacting between batches
    held up every record waiting meanwhile (a hundred milliseconds and more per table); on its
    own thread (delta-rs releases the GIL) it overlaps the scoring. An OPTIMIZE never conflicts
    with the worker's blind appends (it adds no row and the appends read nothing), and the
    worker's kept tables see its commit like any other writer's; the state tables, which the
    worker MERGEs (reading their files), are never compacted here.

    Log checkpoints: delta-rs writes one within every 100th commit of a table, and the worker's
    tables reach it in the same batch; the worker's commits skip them (`Lake.auto_checkpoint`)
    and this thread writes the overdue ones. With `compact_every_s` 0 nothing runs here and the
    commits write their checkpoints as usual.
    """

    def __init__(self, runner: MicroBatchRunner, settings: ContinuousSettings) -> None:
        self.worker_lake = runner.lake
        self.tables = [o.name for o in runner.processor.outputs if o.key is None] + [
            DEAD_LETTER_TABLE,
            CHECKPOINT_TABLE,
        ]
        self.written = [o.name for o in runner.processor.outputs] + [
            DEAD_LETTER_TABLE,
            CHECKPOINT_TABLE,
        ]
        self.every_s = settings.compact_every_s
        self.min_files = settings.compact_min_files
        self.compactions = 0
        self.checkpoints = 0
        self.lake = Lake(runner.lake.location)
        self.lake.auto_checkpoint = False
        self._auto_checkpoint = runner.lake.auto_checkpoint
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (nothing when compaction is off)."""
        if self.every_s <= 0 or self._thread is not None:
            return
        self.worker_lake.auto_checkpoint = False
        self._thread = threading.Thread(
            target=self._run, name=f"compactor-{self.worker_lake.name}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the thread after the table in hand; the worker's commits write their own log
        checkpoints again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.worker_lake.auto_checkpoint = self._auto_checkpoint

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.maintain()
            except Exception as exc:  # an optimisation only: the next round tries again
                log.warning(
                    "compacting %s failed (%s); trying again later", self.lake.location, exc
                )

    def maintain(self) -> str | None:
        """One round: every overdue log checkpoint, then the append-only table with the most
        files compacted if it has enough; the name of the table compacted."""
        for name in self.written:
            if self._stop.is_set():
                return None
            if self.lake.checkpoint_due(name):
                self.lake.checkpoint(name)
                self.checkpoints += 1
        counts = {}
        for name in self.tables:
            table = self.lake.table(name)
            if table is not None:
                counts[name] = len(table.file_uris())
        if not counts or self._stop.is_set():
            return None
        name = max(counts, key=lambda n: counts[n])
        if counts[name] < self.min_files:
            return None
        started = time.perf_counter()
        metrics = self.lake.compact(name)
        self.compactions += 1
        log.info(
            "compacted %s: %s files into %s in %.2fs",
            name,
            metrics["files_removed"],
            metrics["files_added"],
            time.perf_counter() - started,
        )
        return name


def run_continuous(
    runner: MicroBatchRunner,
    stop: StopRequest,
    settings: ContinuousSettings | None = None,
    *,
    on_batch: Callable[[BatchReport], None] | None = None,
    on_report: Callable[[ContinuousReport], None] | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> ContinuousReport:
    """Score `runner`'s source as records arrive until `stop` is set; what was done.

    First the last planned but uncommitted batch is replayed (a crash before this start), then
    one batch per poll, each committed before the next is planned. `on_batch` sees every batch
    after its commit; `on_report` gets the running totals every `report_every_s`; `should_stop`
    is asked every `check_every_s` and returns a reason to stop (or None). An exception from the
    runner (or a callback) ends the worker: the next start replays the batch it was in.
    """
    settings = settings or ContinuousSettings()
    report = ContinuousReport(runner.job)
    compactor = Compactor(runner, settings)
    last_report = last_check = time.monotonic()
    try:
        compactor.start()
        replayed = runner.recover()
        if replayed is not None:
            report.add(replayed)
            if on_batch is not None:
                on_batch(replayed)
        log.info("%s: continuous scoring from %s", runner.job, runner.positions())
        while not stop.is_set():
            batch = runner.step()
            if batch is None:
                report.idle_polls += 1
            else:
                report.add(batch)
                if on_batch is not None:
                    on_batch(batch)
            now = time.monotonic()
            if should_stop is not None and now - last_check >= settings.check_every_s:
                last_check = now
                reason = should_stop()
                if reason:
                    stop.set(reason)
                    break
            report.compactions = compactor.compactions
            if on_report is not None and now - last_report >= settings.report_every_s:
                last_report = now
                on_report(report)
            if batch is None:
                stop.wait(settings.idle_wait_s)
    finally:
        compactor.close()
        report.compactions = compactor.compactions
        report.log_checkpoints = compactor.checkpoints
    report.stop_reason = stop.reason
    report.positions = runner.positions()
    log.info("%s stopped (%s): %s", runner.job, report.stop_reason, report.summary())
    return report
