"""Continuous mode: one long-running worker that scores a stream as its records arrive.

The worker is the micro-batch runner called batch after batch (`MicroBatchRunner.recover`, then
`step` until asked to stop), so every batch is planned, written and committed on the one commit
path with the same exactly-once guarantee as a sensor-launched run; this module only decides when
to poll, when to stop, when to compact and what to report. A read that finds nothing writes
nothing (the runner plans no batch), and the worker waits up to `idle_wait_s` before the next
poll: a source that can say when records arrive (`wait_for_records`) wakes it at once.
Kinesis is read through `streamguard.kinesis_tail.KinesisTailSource`, which reads ahead while a
batch is being written; the worker's tables are compacted on a thread of their own (`Compactor`).
A batch's commit mark goes out in one Delta commit with the next batch's plan while batches
follow each other (`Checkpoints.defer_commits`), and alone once the stream is idle or the worker
stops: one Delta commit fewer per batch, and the same replay rule (see `streamguard.checkpoint`).

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

import pyarrow as pa
from deltalake import PostCommitHookProperties

from streamguard.checkpoint import CHECKPOINT_TABLE, Checkpoints
from streamguard.commit import DEAD_LETTER_TABLE
from streamguard.lake import Lake
from streamguard.runner import BatchReport, MicroBatchRunner

log = logging.getLogger(__name__)

# The pause after a poll that found nothing (a busy stream is read back to back). With Kinesis
# the poll reads the tail source's buffer, and the stream itself is polled at its own pace
# (`streamguard.kinesis_tail`); with Kafka it asks the brokers for each partition's end.
DEFAULT_IDLE_WAIT_S = 0.05
DEFAULT_MAX_BATCH_RECORDS = 10_000
# Every Delta commit (and every read that lists a table's files) costs about 0.15 ms more per
# data file of the table: at 1,000 tx/s, tables left to reach 64 one-batch files before their
# compaction made each batch 10-15 ms slower than tables compacted at 16 (see `Compactor`).
DEFAULT_COMPACT_MIN_FILES = 16
DEFAULT_COMPACT_EVERY_S = 1.0
# The worker packs its small files into files of up to COMPACT_TARGET_BYTES only. OPTIMIZE packs
# the largest candidate first, so each compaction rewrites the file it is growing along with the
# new small ones: up to this much, where Delta's default target (100 MiB) had every compaction
# rewrite tens of MiB on a long run. A file counts as small below a quarter of it.
COMPACT_TARGET_BYTES = 4 * 2**20
SMALL_FILE_BYTES = COMPACT_TARGET_BYTES // 4
# Once this many files are between small and half the table's own target size
# (`delta.targetFileSize`, else delta-rs's 100 MiB), they are packed to that size: a rare, larger
# rewrite that keeps the number of files (and so every commit's cost) from growing with the
# hours the worker runs.
COMPACT_MERGE_FILES = 8
DELTA_TARGET_BYTES = 100 * 2**20
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
    # Every compact_every_s, on a thread beside the scoring (`Compactor`), each of the worker's
    # append-only tables with compact_min_files small files (under SMALL_FILE_BYTES) or more is
    # compacted into files of up to COMPACT_TARGET_BYTES, the one with the most first (and, once
    # COMPACT_MERGE_FILES of those gather, to the table's own target size): a batch every few
    # hundred milliseconds otherwise leaves thousands of small files per table an hour, and every
    # commit and read of the table slows down. 0 turns it off (then the nightly compaction job is
    # the only one).
    compact_every_s: float = DEFAULT_COMPACT_EVERY_S
    compact_min_files: int = DEFAULT_COMPACT_MIN_FILES
    report_every_s: float = DEFAULT_REPORT_EVERY_S
    # How often `should_stop` (e.g. a look at the Dagster run's status) is asked.
    check_every_s: float = 2.0
    # Write a batch's commit mark with the next batch's plan (one Delta commit fewer per batch);
    # written alone at the second idle poll in a row and when the worker stops.
    defer_commits: bool = True

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
    and every commit and read of a table slows down with its files (about 0.15 ms per file and
    commit). Each round packs the small files of every table with `min_files` of them into files
    of up to COMPACT_TARGET_BYTES (a bounded rewrite), and those, once COMPACT_MERGE_FILES of
    them gather, into files of the table's own target size (rarely). Compacting between batches
    held up every record waiting meanwhile (a hundred milliseconds and more per table); on its
    own thread (delta-rs releases the GIL) it overlaps the scoring. An OPTIMIZE never conflicts
    with the worker's blind appends (it adds no row and the appends read nothing). The state
    tables are written merge-on-read (appends too, `Lake.upsert`), so they are compacted here
    as well: an OPTIMIZE keeps every row, superseded ones included, and the worker's memory of
    them stays good across it (`Lake` sees a commit that changed no row). Only the worker's own
    fold (writing a state table whole) can meet an OPTIMIZE; whichever commits second gives way
    (the fold becomes an append, the OPTIMIZE waits for the next round).

    Log checkpoints: delta-rs writes one within every 100th commit of a table, and the worker's
    tables reach it in the same batch; the worker's commits skip them (`Lake.auto_checkpoint`)
    and this thread writes the overdue ones. With `compact_every_s` 0 nothing runs here and the
    commits write their checkpoints as usual.
    """

    def __init__(self, runner: MicroBatchRunner, settings: ContinuousSettings) -> None:
        self.worker_lake = runner.lake
        self.tables = [
            o.name for o in runner.processor.outputs if o.key is None or o.latest_by is not None
        ] + [
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

    def maintain(self) -> list[str]:
        """One round: every overdue log checkpoint, then each append-only table with enough
        small files compacted, the one with the most first; the names of the tables compacted."""
        for name in self.written:
            if self._stop.is_set():
                return []
            if self.lake.checkpoint_due(name):
                self.lake.checkpoint(name)
                self.checkpoints += 1
        due: dict[str, tuple[int, int]] = {}  # name -> (small files, target size)
        for name in self.tables:
            plan = self._plan(name)
            if plan is not None:
                due[name] = plan
        compacted = []
        for name in sorted(due, key=lambda n: -due[n][0]):
            if self._stop.is_set():
                break
            self._compact(name, due[name][1])
            compacted.append(name)
        return compacted

    def _plan(self, name: str) -> tuple[int, int] | None:
        """Whether `name` is due for compaction: (its small files, the target size to compact
        to), or None."""
        table = self.lake.table(name)
        if table is None:
            return None
        sizes = pa.table(table.get_add_actions(flatten=True))["size_bytes"].to_pylist()
        small = sum(1 for size in sizes if size < SMALL_FILE_BYTES)
        if small >= self.min_files:
            return small, COMPACT_TARGET_BYTES
        configured = table.metadata().configuration.get("delta.targetFileSize")
        target = int(configured) if configured else DELTA_TARGET_BYTES
        if sum(1 for s in sizes if SMALL_FILE_BYTES <= s < target // 2) >= COMPACT_MERGE_FILES:
            return small, target
        return None

    def _compact(self, name: str, target_size: int) -> None:
        """OPTIMIZE the table into files of up to `target_size`: blind appends never conflict
        with it, and it keeps every application transaction."""
        table = self.lake.table(name)
        if table is None:
            return
        started = time.perf_counter()
        metrics = table.optimize.compact(
            target_size=target_size,
            post_commithook_properties=PostCommitHookProperties(
                create_checkpoint=False, cleanup_expired_logs=False
            ),
        )
        self.compactions += 1
        log.info(
            "compacted %s: %s files into %s (up to %d MiB each) in %.2fs",
            name,
            metrics.get("numFilesRemoved", 0),
            metrics.get("numFilesAdded", 0),
            target_size // 2**20,
            time.perf_counter() - started,
        )


def wait_for_records(source: object, stop: StopRequest, seconds: float) -> bool:
    """Pause after an empty poll: up to `seconds`, less when the source says records arrived
    (`wait_for_records`, e.g. `KinesisTailSource`; a stop asked for meanwhile is seen after the
    pause) or, for a source that cannot say (waited out), when a stop is asked for. Whether
    records arrived, as far as the source says."""
    waiter = getattr(source, "wait_for_records", None)
    if waiter is None:
        stop.wait(seconds)
        return False
    return bool(waiter(seconds))


def _flush_quietly(checkpoints: Checkpoints) -> None:
    """Write a deferred commit mark on the way out of a failure, without hiding the failure
    (a mark not written only makes the next start replay that batch, which writes nothing)."""
    try:
        checkpoints.flush()
    except Exception as exc:
        log.warning("could not write the last batch's commit mark (%s): it is replayed", exc)


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
    one batch per poll, each wholly written before the next is planned. With
    `settings.defer_commits` a batch's commit mark goes out in the next batch's plan commit, or
    alone at the second idle poll in a row, when stopping and on the way out of an exception.
    `on_batch` sees every batch once all its outputs are written (its mark perhaps still
    deferred); `on_report` gets the running totals every `report_every_s`; `should_stop` is asked
    every `check_every_s` and returns a reason to stop (or None). An exception from the runner
    (or a callback) ends the worker: the next start replays the batch it was in (a whole batch
    whose mark did not land writes nothing again).
    """
    settings = settings or ContinuousSettings()
    report = ContinuousReport(runner.job)
    compactor = Compactor(runner, settings)
    checkpoints = runner.checkpoints
    deferred = checkpoints.defer_commits
    last_report = last_check = time.monotonic()
    idle = 0  # idle polls in a row
    try:
        compactor.start()
        checkpoints.defer_commits = settings.defer_commits
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
                idle += 1
                if idle >= 2:  # the stream went quiet: the last batch's mark goes out alone
                    checkpoints.flush()
            else:
                idle = 0
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
                wait_for_records(runner.source, stop, settings.idle_wait_s)
        checkpoints.flush()
    except BaseException:
        _flush_quietly(checkpoints)  # the batch noted last is whole: its mark spares a replay
        raise
    finally:
        checkpoints.defer_commits = deferred
        compactor.close()
        report.compactions = compactor.compactions
        report.log_checkpoints = compactor.checkpoints
    report.stop_reason = stop.reason
    report.positions = runner.positions()
    log.info("%s stopped (%s): %s", runner.job, report.stop_reason, report.summary())
    return report
