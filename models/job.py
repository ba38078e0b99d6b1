"""The fraud scoring job: what one micro-batch of raw stream records becomes.

Parse and validate, drop duplicates, compute the stateful features against the stored state,
score with the registered model, apply the rules, decide alerts, and hand back the rows for each
table. The runtime does the reading of the stream, the writing of Delta tables and the
checkpointing; this module never imports it (it gets a `lake` object that can read).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.accounts import (
    ACCOUNTS_HISTORY,
    HISTORY_COLUMNS,
    history_filter,
    with_accounts,
)
from models.features import (
    CUSTOMER_STATE_SCHEMA,
    FEATURE_SCHEMA,
    TERMINAL_STATE_SCHEMA,
    FeatureState,
    FeatureVersionError,
    check_feature_version,
    compute_features,
    feature_version_of,
    with_feature_version,
)
from models.known_frauds import (
    KNOWN_FRAUDS,
    KNOWN_FRAUDS_TABLE_SCHEMA,
    KNOWN_LABEL_FILES,
    KNOWN_LABEL_FILES_SCHEMA,
    KnownFrauds,
    known_frauds,
)
from models.protocols import LakeReader, Processed, RecordLike, TableOutput
from models.registry import (
    CHALLENGER,
    MODEL_NAME,
    LoadedModel,
    StoreStamp,
    alert_threshold,
    alias_version,
    load_model,
    resolve_version,
    store_stamp,
)
from models.rules import RULES, AlertPolicy, decide, rule_matrix
from models.schema import (
    DUPLICATE_EARLIER,
    DUPLICATE_IN_BATCH,
    LABEL_SCHEMA,
    LABELS,
    RESCUED_DATA,
    TIMESTAMP,
    TRANSACTION_SCHEMA,
    parse_records,
)
from models.training import score

TRANSACTIONS = "transactions"
FEATURES = "features"
SCORES = "scores"
ALERTS = "alerts"
SHADOW_SCORES = "shadow_scores"
CUSTOMER_STATE = "customer_state"
TERMINAL_STATE = "terminal_state"
EVENT_DATE = "event_date"

_LINEAGE = [
    pa.field("batch_id", pa.int64(), nullable=False),
    pa.field("shard_id", pa.string()),
    pa.field("sequence_number", pa.string()),
    pa.field("ingested_at", TIMESTAMP),
    # The record as the stream keyed it: Kinesis partition key or Kafka record key; and the
    # Kafka record's headers as a JSON list of [name, value] pairs (null where there are none).
    pa.field("partition_key", pa.string()),
    pa.field("headers", pa.string()),
    # What the source could not fit to its schema (a file source's `_rescued_data`), as canonical
    # JSON text; null where there was nothing. Never seen by the feature function.
    pa.field(RESCUED_DATA, pa.string()),
    # The event time's UTC date: the table's partition column, so reads by time (the duplicate
    # lookup, the known frauds) open only the days they need, however long the lake has run.
    pa.field(EVENT_DATE, pa.date32()),
]
TRANSACTIONS_TABLE_SCHEMA = pa.schema([*TRANSACTION_SCHEMA, *_LINEAGE])
# A repeated transaction id is looked for on its own event date (a producer retry or a replayed
# record repeats the whole record, its event time with it).
FEATURES_TABLE_SCHEMA = pa.schema(
    [
        *FEATURE_SCHEMA,
        pa.field("feature_version", pa.string()),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("batch_id", pa.int64(), nullable=False),
    ]
)
SCORES_TABLE_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        pa.field("customer_id", pa.string()),
        pa.field("terminal_id", pa.string()),
        pa.field("event_time", TIMESTAMP),
        pa.field("score", pa.float64()),
        pa.field("rules", pa.string()),  # comma-separated rule names that fired
        pa.field("alert", pa.bool_()),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("batch_id", pa.int64(), nullable=False),
        pa.field("scored_at", TIMESTAMP),
    ]
)
ALERTS_TABLE_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        pa.field("customer_id", pa.string()),
        pa.field("terminal_id", pa.string()),
        pa.field("event_time", TIMESTAMP),
        pa.field("amount", pa.float64()),
        pa.field("score", pa.float64()),
        pa.field("reason", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("batch_id", pa.int64(), nullable=False),
        pa.field("created_at", TIMESTAMP),
    ]
)
# The challenger's score of the same feature rows: compared with the champion's, never alerted on.
SHADOW_SCORES_TABLE_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        pa.field("event_time", TIMESTAMP),
        pa.field("customer_id", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("batch_id", pa.int64(), nullable=False),
        pa.field("scored_at", TIMESTAMP),
    ]
)
_UPDATED = [pa.field("batch_id", pa.int64()), pa.field("updated_at", TIMESTAMP)]
CUSTOMER_STATE_TABLE_SCHEMA = pa.schema([*CUSTOMER_STATE_SCHEMA, *_UPDATED])
TERMINAL_STATE_TABLE_SCHEMA = pa.schema([*TERMINAL_STATE_SCHEMA, *_UPDATED])


# The statistics kept per file: the ids and times reads filter on, and the batch id (the lake's
# numbering, `streamguard.commit.next_batch_id`); not the features, scores and lists.
_IDS = ("transaction_id", "event_time", "customer_id", "terminal_id", "batch_id")

# Written in this order; state last, so a replayed batch reads the state from before it. Scores
# and alerts first: they are what a reader waits for (each commit before them delays the alert by
# its milliseconds); the other appends are independent of each other and of them.
# The two state tables are written last and at once (`last_together`): a customer's new state
# comes from its stored state and the batch alone, a terminal's likewise, never from the other.
OUTPUTS: tuple[TableOutput, ...] = (
    TableOutput(SCORES, SCORES_TABLE_SCHEMA, stats_columns=_IDS),
    TableOutput(ALERTS, ALERTS_TABLE_SCHEMA),
    TableOutput(
        TRANSACTIONS, TRANSACTIONS_TABLE_SCHEMA, partition_by=(EVENT_DATE,), stats_columns=_IDS
    ),
    TableOutput(FEATURES, FEATURES_TABLE_SCHEMA, stats_columns=_IDS),
    TableOutput(SHADOW_SCORES, SHADOW_SCORES_TABLE_SCHEMA),
    TableOutput(KNOWN_FRAUDS, KNOWN_FRAUDS_TABLE_SCHEMA, ("transaction_id",)),
    TableOutput(KNOWN_LABEL_FILES, KNOWN_LABEL_FILES_SCHEMA),
    TableOutput(
        CUSTOMER_STATE,
        CUSTOMER_STATE_TABLE_SCHEMA,
        ("customer_id",),
        stats_columns=("customer_id", "last_event_time", "batch_id"),
        in_memory=True,
        latest_by="batch_id",
        last_together=True,
    ),
    TableOutput(
        TERMINAL_STATE,
        TERMINAL_STATE_TABLE_SCHEMA,
        ("terminal_id",),
        stats_columns=("terminal_id", "last_event_time", "batch_id"),
        in_memory=True,
        latest_by="batch_id",
        last_together=True,
    ),
)
TABLE_SCHEMAS: dict[str, pa.Schema] = {o.name: o.schema for o in OUTPUTS} | {LABELS: LABEL_SCHEMA}


@dataclass(frozen=True)
class ScoringContext:
    """What one batch is scored with, resolved when it is planned and recorded whole.

    A replayed batch loads it back, so it scores with the same model versions, sees the same
    labels and alerts at the same threshold as its first attempt, whatever moved in between.
    """

    model_name: str
    model_version: str
    challenger_version: str | None = None
    labels_version: int | None = None
    alert_threshold: float | None = None
    # The `accounts_history` version the batch's as-of account lookup reads (None: no table).
    accounts_version: int | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> ScoringContext:
        """A recorded context; keys a plan from before a field existed default to None."""
        data = json.loads(text or "{}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown keys in a recorded scoring context: {sorted(unknown)}")
        if "model_version" not in data:
            raise ValueError("a recorded scoring context has no model_version")
        return cls(
            model_name=str(data.get("model_name") or MODEL_NAME),
            model_version=str(data["model_version"]),
            challenger_version=data.get("challenger_version") or None,
            labels_version=data.get("labels_version"),
            alert_threshold=data.get("alert_threshold"),
            accounts_version=data.get("accounts_version"),
        )


# How long a resolved alias is trusted without asking the registry again. A SQLite store is
# looked at (`store_stamp`) before every plan, so a move of the alias there is seen by the next
# batch; other stores are asked at most this often, and an alias move reaches the scoring this
# late at most. Continuous mode plans a batch every few hundred milliseconds: asking every time
# cost tens of milliseconds per batch.
ALIAS_RECHECK_S = 5.0
# A stamp whose newest file time is this recent may not show a write made in the same clock
# tick yet: the aliases are asked again until the store has been still this long.
STAMP_SETTLE_NS = 1_000_000_000


@dataclass(frozen=True)
class _Resolved:
    """The champion and challenger versions as the registry gave them, and when."""

    champion: str
    challenger: str | None
    at: float  # time.monotonic()
    stamp: StoreStamp | None
    settled: bool  # the stamp was older than STAMP_SETTLE_NS when taken


class FraudScoringJob:
    """Scores micro-batches with one model version per batch (recorded in the batch plan).

    When a challenger exists (the `challenger` alias, or a given `challenger` model), it scores
    the same feature rows into `shadow_scores`; its version is recorded in the plan too, so a
    replayed batch shadow-scores with the same version. Alerts come from the champion only.

    The alert threshold is the one stored with the champion version (tag `alert_threshold`, chosen
    on its validation period for an alert budget), else `policy.threshold`; it is resolved in the
    plan, so a replayed batch alerts exactly as planned. `rule_threshold` is lowered to it if
    needed (a rule hit never needs a higher score than no rule).

    The aliases are resolved again only when the registry may have changed (`ALIAS_RECHECK_S`,
    `store_stamp`); loaded models are kept, and those no alias points at any more are dropped
    when the aliases move (a replay of an older plan loads its version again).
    """

    outputs = OUTPUTS

    def __init__(
        self,
        tracking_uri: str | None,
        model_name: str = MODEL_NAME,
        alias: str = "champion",
        policy: AlertPolicy | None = None,
        model: LoadedModel | None = None,
        challenger: LoadedModel | None = None,
        shadow: bool = True,
        alias_recheck_s: float = ALIAS_RECHECK_S,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.alias_recheck_s = alias_recheck_s
        self._resolved: _Resolved | None = None
        self.alias_lookups = 0  # how many times the registry was asked (observability, tests)
        self.model_name = model_name
        self.alias = alias
        self.policy = policy or AlertPolicy()
        self.shadow = shadow
        self._models: dict[str, LoadedModel] = {}
        if model is not None:  # an already-loaded model (benchmarks, replays)
            self._models[model.version] = model
            self._fixed = model.version
        else:
            self._fixed = ""
        self._fixed_challenger = ""
        self._thresholds: dict[str, float | None] = {}
        if challenger is not None:
            if challenger.version in self._models:
                raise ValueError(f"the challenger has the champion's version {challenger.version}")
            self._models[challenger.version] = challenger
            self._fixed_challenger = challenger.version

    def _challenger_version(self, champion: str) -> str | None:
        """The version to shadow-score with, or None (none set, shadowing off, or the champion)."""
        if not self.shadow:
            return None
        if self._fixed_challenger:
            return self._fixed_challenger
        if self._fixed or self.tracking_uri is None:
            return None  # a fixed champion is not mixed with the registry's challenger
        version = alias_version(self.tracking_uri, self.model_name, CHALLENGER)
        return None if version == champion else version

    def _registry_versions(self) -> tuple[str, str | None]:
        """Champion and challenger versions from the registry, asked again only when it may
        have changed since the last answer (see `ALIAS_RECHECK_S`)."""
        assert self.tracking_uri is not None
        now = time.monotonic()
        stamp = store_stamp(self.tracking_uri)
        last = self._resolved
        if (
            last is not None
            and now - last.at < self.alias_recheck_s
            and (stamp is None or (last.settled and stamp == last.stamp))
        ):
            return last.champion, last.challenger
        self.alias_lookups += 1
        champion = resolve_version(self.tracking_uri, self.model_name, self.alias)
        challenger = self._challenger_version(champion)
        settled = stamp is not None and time.time_ns() - stamp.newest_ns > STAMP_SETTLE_NS
        self._resolved = _Resolved(champion, challenger, now, stamp, settled)
        if last is not None and (last.champion, last.challenger) != (champion, challenger):
            keep = {champion, challenger, self._fixed, self._fixed_challenger}
            self._models = {v: m for v, m in self._models.items() if v in keep}
        return champion, challenger

    def plan_context(self, lake: LakeReader) -> ScoringContext:
        if self._fixed:
            version = self._fixed
            challenger = self._challenger_version(version)
        else:
            version, challenger = self._registry_versions()
        return ScoringContext(
            model_name=self.model_name,
            model_version=version,
            challenger_version=challenger,
            labels_version=lake.version(LABELS),
            alert_threshold=self._version_threshold(version),
            accounts_version=lake.version(ACCOUNTS_HISTORY),
        )

    def load_context(self, text: str) -> ScoringContext:
        return ScoringContext.from_json(text)

    def _version_threshold(self, version: str) -> float | None:
        """The threshold stored with `version` (cached: a version's tag is set when registered)."""
        if version not in self._thresholds:
            if version in self._models:
                self._thresholds[version] = self._models[version].alert_threshold
            elif self.tracking_uri is not None:
                self._thresholds[version] = alert_threshold(
                    self.tracking_uri, self.model_name, version
                )
            else:
                self._thresholds[version] = None
        return self._thresholds[version]

    def policy_for(self, context: ScoringContext) -> AlertPolicy:
        """`self.policy` with the planned version's threshold (plans without one: unchanged)."""
        threshold = context.alert_threshold
        if threshold is None:
            return self.policy
        threshold = float(threshold)
        return dataclasses.replace(
            self.policy,
            threshold=threshold,
            rule_threshold=min(self.policy.rule_threshold, threshold),
        )

    def _model(self, version: str) -> LoadedModel:
        if version not in self._models:
            assert self.tracking_uri is not None, "no tracking URI to load the model from"
            self._models[version] = load_model(self.tracking_uri, self.model_name, version)
        return self._models[version]

    def process(
        self,
        records: Sequence[RecordLike],
        batch_id: int,
        context: ScoringContext,
        lake: LakeReader,
    ) -> Processed:
        now = datetime.now(UTC)
        valid, transactions, rejected = prepare(records, batch_id, lake, now)
        valid, known = feature_inputs(lake, valid, batch_id, context)
        state = load_state(lake, valid)
        delay = self.feature_delay_days(context)
        result = compute_features(valid, state, known.frauds, delay)
        features = with_feature_version(result.features, delay)
        shadow = self._shadow_features(valid, state, known, context, delay)
        tables = self.assemble(
            features,
            result.state,
            transactions,
            context,
            batch_id,
            now,
            known,
            shadow_features=shadow,
        )
        stats = {
            "valid": valid.num_rows,
            "rejected": len(rejected),
            "alerts": tables[ALERTS].num_rows,
            "known_frauds": known.frauds.num_rows,
            "known_frauds_added": known.new.num_rows,
            "model_version": context.model_version,
            "challenger_version": context.challenger_version or "",
            "shadow_scored": tables[SHADOW_SCORES].num_rows,
            "feature_version": feature_version_of(features),
        }
        return Processed(tables, rejected, stats)

    def feature_delay_days(self, context: ScoringContext) -> int:
        """The label delay D to compute the batch's features with: the planned champion's, so
        they are computed the way it trained (a replayed plan gets the same). Engines computing
        features themselves must pass it to `compute_features` and mark the result
        (`with_feature_version`); `score` refuses features of another version."""
        return self._model(context.model_version).feature_delay_days

    def _shadow_features(
        self,
        valid: pa.Table,
        state: FeatureState,
        known: KnownFrauds,
        context: ScoringContext,
        champion_delay: int,
    ) -> pa.Table | None:
        """The challenger's own features when its label delay D differs from the champion's
        (same state and frauds, its D); None when the champion's serve, or it has no usable D."""
        if not context.challenger_version or valid.num_rows == 0:
            return None
        try:
            delay = self._model(str(context.challenger_version)).feature_delay_days
        except FeatureVersionError:
            return None  # not shadow-scored (`shadow_score`): the alerts must not wait on it
        if delay == champion_delay:
            return None
        features = compute_features(valid, state, known.frauds, delay).features
        return with_feature_version(features, delay)

    def assemble(
        self,
        features: pa.Table,
        state: FeatureState,
        transactions: pa.Table,
        context: ScoringContext,
        batch_id: int,
        now: datetime,
        known: KnownFrauds,
        *,
        shadow_features: pa.Table | None = None,
    ) -> dict[str, pa.Table]:
        """Every output table of a batch from its features and new state, whatever computed them.

        The one place the rows are made, so every engine writes exactly the same tables.
        `features` are marked with their version (`with_feature_version`; unmarked: the default
        one) and must be the champion's; `shadow_features`, when given, are the challenger's.
        """
        tables = self.score(features, context, batch_id, now)
        tables[SHADOW_SCORES] = self.shadow_score(
            features if shadow_features is None else shadow_features, context, batch_id, now
        )
        tables[TRANSACTIONS] = transactions
        tables[KNOWN_FRAUDS] = known.new
        tables[KNOWN_LABEL_FILES] = known.label_files
        tables[CUSTOMER_STATE] = _stamped(state.customers, batch_id, now)
        tables[TERMINAL_STATE] = _stamped(state.terminals, batch_id, now)
        return tables

    def shadow_score(
        self, features: pa.Table, context: ScoringContext, batch_id: int, now: datetime
    ) -> pa.Table:
        """The planned challenger's scores of the same rows; empty when the plan names none.

        Plans from before shadow scoring have no `challenger_version`: replayed as planned, empty.
        A challenger trained on another feature version than `features`' (another label delay
        the engine did not compute, or one this code cannot) is not shadow-scored either: wrong
        features would make its comparison with the champion meaningless.
        """
        version = context.challenger_version
        if not version or features.num_rows == 0:
            return SHADOW_SCORES_TABLE_SCHEMA.empty_table()
        loaded = self._model(str(version))
        if loaded.feature_version != feature_version_of(features):
            return SHADOW_SCORES_TABLE_SCHEMA.empty_table()
        probability = score(loaded.model, features)  # from Arrow, as `score`
        n = features.num_rows
        return pa.table(
            {
                "transaction_id": features["transaction_id"],
                "event_time": features["event_time"],
                "customer_id": features["customer_id"],
                "score": pa.array(probability, pa.float64()),
                "model_name": pa.repeat(pa.scalar(loaded.name, pa.string()), n),
                "model_version": pa.repeat(pa.scalar(loaded.version, pa.string()), n),
                "batch_id": pa.array(np.full(n, batch_id), pa.int64()),
                "scored_at": pa.repeat(pa.scalar(now, TIMESTAMP), n),
            },
            schema=SHADOW_SCORES_TABLE_SCHEMA,
        )

    def score(
        self, features: pa.Table, context: ScoringContext, batch_id: int, now: datetime
    ) -> dict[str, pa.Table]:
        """Model score + rules -> alert decision, as rows for the features/scores/alerts tables.

        Raises FeatureVersionError when `features` were computed at another version (another
        label delay D) than the model was trained on.
        """
        loaded = self._model(context.model_version)
        check_feature_version(
            features, loaded.feature_version, f"{loaded.name} version {loaded.version}"
        )
        version_computed = feature_version_of(features)
        features = features.replace_schema_metadata(None)
        # Scored and ruled from Arrow: the model's float64 matrix and the rules' ten columns are
        # built straight from the table's columns, bit-identical to the pandas path (converting
        # the whole table, ids and times too, was about half of this step for 200 rows).
        probability = score(loaded.model, features)
        policy = self.policy_for(context)
        fired = rule_matrix(features, policy)
        alert, reasons = decide(probability, fired, policy)
        n = features.num_rows
        rules = np.full(n, "", dtype=object)
        for row in np.flatnonzero(fired.any(axis=1)):  # few rows fire a rule: join only those
            rules[row] = ",".join(r for r, on in zip(RULES, fired[row], strict=True) if on)
        batch = pa.array(np.full(n, batch_id), pa.int64())
        version = pa.repeat(pa.scalar(loaded.version, pa.string()), n)
        feats = (
            features.append_column(
                "feature_version", pa.repeat(pa.scalar(version_computed, pa.string()), n)
            )
            .append_column("model_name", pa.repeat(pa.scalar(loaded.name, pa.string()), n))
            .append_column("model_version", version)
            .append_column("batch_id", batch)
        )
        scores = pa.table(
            {
                "transaction_id": features["transaction_id"],
                "customer_id": features["customer_id"],
                "terminal_id": features["terminal_id"],
                "event_time": features["event_time"],
                "score": pa.array(probability, pa.float64()),
                "rules": pa.array(rules, pa.string()),
                "alert": pa.array(alert, pa.bool_()),
                "model_name": pa.repeat(pa.scalar(loaded.name, pa.string()), n),
                "model_version": version,
                "batch_id": batch,
                "scored_at": pa.repeat(pa.scalar(now, TIMESTAMP), n),
            },
            schema=SCORES_TABLE_SCHEMA,
        )
        mask = pa.array(alert, pa.bool_())
        flagged = features.filter(mask)
        m = flagged.num_rows
        alerts = pa.table(
            {
                "transaction_id": flagged["transaction_id"],
                "customer_id": flagged["customer_id"],
                "terminal_id": flagged["terminal_id"],
                "event_time": flagged["event_time"],
                "amount": flagged["amount"],
                "score": pa.array(probability[alert], pa.float64()),
                "reason": pa.array(
                    [r for r, a in zip(reasons, alert, strict=True) if a], pa.string()
                ),
                "model_version": pa.array([loaded.version] * m, pa.string()),
                "batch_id": pa.array(np.full(m, batch_id), pa.int64()),
                "created_at": pa.array([now] * m, TIMESTAMP),
            },
            schema=ALERTS_TABLE_SCHEMA,
        )
        return {FEATURES: feats, SCORES: scores, ALERTS: alerts}


def _stamped(table: pa.Table, batch_id: int, now: datetime) -> pa.Table:
    n = table.num_rows
    return table.append_column(
        "batch_id", pa.array(np.full(n, batch_id), pa.int64())
    ).append_column("updated_at", pa.repeat(pa.scalar(now, TIMESTAMP), n))


def prepare(
    records: Sequence[RecordLike], batch_id: int, lake: LakeReader, now: datetime
) -> tuple[pa.Table, pa.Table, list[tuple[int, str]]]:
    """Raw records -> (valid transactions, their `transactions` rows, rejected (index, reason)).

    Parse and validate, then drop repeated transaction ids; what every engine does first when
    the records reach it whole (the state-store engine parses on its executors instead).
    """
    parsed = parse_records([r.data for r in records])
    rejected = [(r.index, r.reason) for r in parsed.rejected]
    valid, dupes = drop_duplicates(parsed.valid, lake, batch_id)
    rejected.extend(dupes)
    index = valid["record_index"].to_numpy()
    rescued = valid[RESCUED_DATA]
    valid = valid.drop_columns(["record_index", RESCUED_DATA])  # TRANSACTION_SCHEMA exactly
    kept = [records[i] for i in index]
    transactions = with_lineage(
        valid,
        batch_id,
        pa.array([r.shard_id for r in kept], pa.string()),
        pa.array([r.sequence_number for r in kept], pa.string()),
        now,
        partition_keys=pa.array([r.partition_key for r in kept], pa.string()),
        headers=pa.array([headers_json(r) for r in kept], pa.string()),
        rescued=rescued,
    )
    return valid, transactions, rejected


def with_lineage(
    valid: pa.Table,
    batch_id: int,
    shard_ids: pa.Array | pa.ChunkedArray,
    sequence_numbers: pa.Array | pa.ChunkedArray,
    now: datetime,
    *,
    partition_keys: pa.Array | pa.ChunkedArray | None = None,
    headers: pa.Array | pa.ChunkedArray | None = None,
    rescued: pa.Array | pa.ChunkedArray | None = None,
) -> pa.Table:
    """Valid transactions as `transactions` rows: where each came from and in which batch.

    `rescued`: each row's rescued data as JSON text (`_rescued_data`; null: none).
    """
    n = valid.num_rows
    return (
        valid.append_column("batch_id", pa.array(np.full(n, batch_id), pa.int64()))
        .append_column("shard_id", shard_ids)
        .append_column("sequence_number", sequence_numbers)
        .append_column("ingested_at", pa.repeat(pa.scalar(now, TIMESTAMP), n))
        .append_column(
            "partition_key", pa.nulls(n, pa.string()) if partition_keys is None else partition_keys
        )
        .append_column("headers", pa.nulls(n, pa.string()) if headers is None else headers)
        .append_column(RESCUED_DATA, pa.nulls(n, pa.string()) if rescued is None else rescued)
        .append_column(EVENT_DATE, pc.cast(valid["event_time"], pa.date32()))
    )


def headers_json(record: RecordLike) -> str | None:
    """A record's headers (Kafka's; other streams have none) as a JSON list of [name, value]."""
    pairs = getattr(record, "headers", None)
    if not pairs:
        return None
    return json.dumps(
        [[k, None if v is None else v.decode("utf-8", "backslashreplace")] for k, v in pairs]
    )


def drop_duplicates(
    valid: pa.Table, lake: LakeReader, batch_id: int
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """A transaction id is scored once: repeats (in the batch or earlier) are rejected.

    Earlier batches are searched on the batch's event dates only (the partitions of
    `transactions`; a repeat with another event date is not caught there: a retry repeats the
    whole record), and through the lake's index of the ids in each of their files, so the
    lookup costs the same on a date's first batch and its thousandth, and only the files whose
    ids hash like the batch's are read for the exact answer. Rows written before the table had
    `event_date` are always searched. `valid` carries `record_index`; the rejected come back as
    (record_index, reason).
    """
    ids = valid["transaction_id"].to_numpy(zero_copy_only=False)
    first = ~pd.Series(ids).duplicated(keep="first").to_numpy()  # hashing, no string sort
    rejected = [(int(i), DUPLICATE_IN_BATCH) for i in valid["record_index"].to_numpy()[~first]]
    valid = valid.filter(pa.array(first))
    if valid.num_rows == 0:  # every record rejected: nothing to look up
        return valid, rejected
    dates = pc.unique(pc.cast(valid["event_time"], pa.date32()).combine_chunks())
    # None: the index cannot answer (a date's first lookup in this process, or a date over
    # the index's memory budget); then every file of the dates is read instead.
    files = lake.files_holding(
        TRANSACTIONS,
        "transaction_id",
        valid["transaction_id"],
        EVENT_DATE,
        [*dates.to_pylist(), None],
    )
    if files == []:
        return valid, rejected  # no file holds an id hashing like the batch's: no repeat
    seen = lake.read(
        TRANSACTIONS,
        columns=["transaction_id"],
        # combine_chunks: a chunkless column would make an untyped (null) value set
        filter=(pc.field(EVENT_DATE).isin(dates) | pc.field(EVENT_DATE).is_null())
        & pc.field("transaction_id").isin(valid["transaction_id"].combine_chunks())
        & (pc.field("batch_id") < batch_id),
        schema=TRANSACTIONS_TABLE_SCHEMA,
        files=files,
    )["transaction_id"]
    if len(seen):
        again = pc.is_in(valid["transaction_id"], value_set=seen.combine_chunks())
        rejected += [
            (int(i), DUPLICATE_EARLIER) for i in valid.filter(again)["record_index"].to_numpy()
        ]
        valid = valid.filter(pc.invert(again))
    return valid, rejected


def load_state(lake: LakeReader, valid: pa.Table) -> FeatureState:
    """The stored state of the batch's customers and terminals (only those)."""
    customers = lake.read(
        CUSTOMER_STATE,
        columns=CUSTOMER_STATE_SCHEMA.names,
        filter=pc.field("customer_id").isin(pc.unique(valid["customer_id"])),
        schema=CUSTOMER_STATE_TABLE_SCHEMA,
    )
    return FeatureState(customers.cast(CUSTOMER_STATE_SCHEMA), load_terminal_state(lake, valid))


def load_terminal_state(lake: LakeReader, valid: pa.Table) -> pa.Table:
    """The stored state of the batch's terminals (the state-store engine keeps customers itself)."""
    terminals = lake.read(
        TERMINAL_STATE,
        columns=TERMINAL_STATE_SCHEMA.names,
        filter=pc.field("terminal_id").isin(pc.unique(valid["terminal_id"])),
        schema=TERMINAL_STATE_TABLE_SCHEMA,
    )
    return terminals.cast(TERMINAL_STATE_SCHEMA)


def feature_inputs(
    lake: LakeReader, valid: pa.Table, batch_id: int, context: ScoringContext
) -> tuple[pa.Table, KnownFrauds]:
    """What the feature function reads besides the state, as the plan pinned it: the valid
    transactions with their account as of each event (FEATURE_INPUT_SCHEMA), the known frauds."""
    known = batch_known_frauds(lake, valid, batch_id, context.labels_version)
    accounts = load_accounts(lake, valid, context.accounts_version)
    return with_accounts(valid, accounts), known


def batch_known_frauds(
    lake: LakeReader, valid: pa.Table, batch_id: int, labels_version: int | None
) -> KnownFrauds:
    """The frauds reported by the batch's events and what the batch adds to `known_frauds`, at
    the labels version the plan recorded (`models.known_frauds`)."""
    return known_frauds(
        lake, valid, batch_id, labels_version, TRANSACTIONS, TRANSACTIONS_TABLE_SCHEMA, _since
    )


def _since(moment: pa.Scalar) -> pc.Expression:
    """Rows of `transactions` with event time after `moment` (their partitions only)."""
    day = pc.cast(moment, pa.date32())
    return (pc.field(EVENT_DATE).is_null() | (pc.field(EVENT_DATE) >= day)) & (
        pc.field("event_time") > moment
    )


def load_accounts(
    lake: LakeReader, valid: pa.Table, accounts_version: int | None
) -> pa.Table | None:
    """The account versions the batch's as-of lookup needs, at the version the plan recorded.

    Only the batch's customers, and only versions that may be valid at one of its events (begun
    by its last event, not ended before its first); None when the plan names no version.
    """
    if accounts_version is None or valid.num_rows == 0:
        return None
    return lake.read(
        ACCOUNTS_HISTORY,
        columns=HISTORY_COLUMNS,
        filter=history_filter(valid),
        version=accounts_version,
    )
