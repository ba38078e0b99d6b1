"""The analyst rules and the alert decision on hand-made feature rows."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from models.accounts import AccountChanges, account_history
from models.features import FEATURE_COLUMNS, replay
from models.job import ALERTS, SCORES, FraudScoringJob, ScoringContext
from models.registry import MODEL_NAME, LoadedModel
from models.rules import RULE_COLUMNS, RULES, SOFT_RULES, AlertPolicy, decide, rule_hits
from models.simulate import Simulation
from models.training import score

POLICY = AlertPolicy()

# A debit that fires no rule: healthy balance, seen place, a quiet hour.
QUIET = {c: 0.0 for c in FEATURE_COLUMNS} | {
    "amount": 50.0,
    "is_debit": 1.0,
    "balance_before": 2000.0,
    "amount_balance_ratio": 0.025,
    "location_seen_before": 1.0,
    "n_locations_seen": 4.0,
    "count_1h": 0.0,
}
DRAIN = {"balance_before": 250.0, "amount": 240.0, "amount_balance_ratio": 0.96}
NEW_PLACE = {"location_seen_before": 0.0, "n_locations_seen": 3.0}
BURST = {"count_1h": 5.0}


def frame(*rows: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame([QUIET | r for r in rows], columns=FEATURE_COLUMNS)


def fired(*rows: dict[str, float], policy: AlertPolicy = POLICY) -> list[list[str]]:
    hits = rule_hits(frame(*rows), policy)
    return [[r for r in RULES if hits.at[i, r]] for i in hits.index]


def test_quiet_row_fires_nothing_and_output_shape() -> None:
    features = frame({}, {}).set_axis([10, 20])  # a non-default index is kept
    hits = rule_hits(features, POLICY)
    assert list(hits.columns) == list(RULES)
    assert list(hits.index) == [10, 20]
    assert all(dtype == np.dtype(bool) for dtype in hits.dtypes)
    assert not hits.to_numpy().any()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, True),
        ({"is_debit": 0.0}, False),  # a credit is not a withdrawal
        ({"balance_before": 300.0}, False),  # not below the low-balance line
        ({"amount_balance_ratio": 0.79}, False),
        ({"amount_balance_ratio": 0.8}, True),  # the ratio bound is inclusive
        ({"amount": 99.0}, False),  # small amounts are ignored
        ({"amount": 100.0}, True),
        ({"balance_before": math.nan}, False),
        ({"amount_balance_ratio": math.nan}, False),
        ({"is_debit": math.nan}, False),
    ],
)
def test_low_balance_large_withdrawal(change: dict[str, float], expected: bool) -> None:
    assert fired(DRAIN | change) == [["low_balance_large_withdrawal"] if expected else []]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, True),
        ({"location_seen_before": 1.0}, False),
        ({"n_locations_seen": 2.0}, False),  # too little history to call a place new
        ({"location_seen_before": math.nan}, False),  # no location on the transaction
        ({"n_locations_seen": math.nan}, False),
    ],
)
def test_never_seen_location(change: dict[str, float], expected: bool) -> None:
    assert fired(NEW_PLACE | change) == [["never_seen_location"] if expected else []]


@pytest.mark.parametrize(("count", "expected"), [(5.0, True), (9.0, True), (4.0, False)])
def test_velocity_burst(count: float, expected: bool) -> None:
    assert fired({"count_1h": count}) == [["velocity_burst"] if expected else []]
    assert fired({"count_1h": math.nan}) == [[]]


def test_all_rules_together_and_policy_changes_them() -> None:
    assert fired(DRAIN | NEW_PLACE | BURST) == [list(SOFT_RULES)]
    strict = AlertPolicy(velocity_1h=10, min_locations_for_new=5, low_balance=100.0)
    assert fired(DRAIN | NEW_PLACE | BURST, policy=strict) == [[]]


def test_all_nan_row_fires_nothing() -> None:
    features = pd.DataFrame([[math.nan] * len(FEATURE_COLUMNS)], columns=FEATURE_COLUMNS)
    assert not rule_hits(features, POLICY).to_numpy().any()


def test_empty_batch() -> None:
    hits = rule_hits(pd.DataFrame(columns=FEATURE_COLUMNS, dtype=float), POLICY)
    assert list(hits.columns) == list(RULES) and len(hits) == 0
    alert, reasons = decide(np.zeros(0), hits, POLICY)
    assert alert.shape == (0,) and reasons == []


def test_decide_model_and_rule_branches_with_reasons() -> None:
    features = frame(
        {},  # model alone, high score
        NEW_PLACE,  # rule + moderate score
        NEW_PLACE,  # rule but score too low
        {},  # moderate score, no rule
        DRAIN | BURST,  # model alone would do; the rules are named too
        {},  # threshold is inclusive
        BURST,  # rule_threshold is inclusive
        BURST,  # an unknown score never alerts
    )
    scores = np.array([0.93, 0.25, 0.15, 0.45, 0.6, 0.5, 0.2, math.nan])
    alert, reasons = decide(scores, rule_hits(features, POLICY), POLICY)
    assert alert.dtype == bool
    assert alert.tolist() == [True, True, False, False, True, True, True, False]
    assert reasons == [
        "model 0.93",
        "model 0.25; rules: never_seen_location",
        "",
        "",
        "model 0.60; rules: low_balance_large_withdrawal, velocity_burst",
        "model 0.50",
        "model 0.20; rules: velocity_burst",
        "",
    ]


def test_decide_follows_the_policy() -> None:
    hits = rule_hits(frame(BURST, {}), POLICY)
    scores = np.array([0.3, 0.7])
    lenient = AlertPolicy(threshold=0.6, rule_threshold=0.3)
    strict = AlertPolicy(threshold=0.8, rule_threshold=0.5)
    assert decide(scores, hits, lenient)[0].tolist() == [True, True]
    assert decide(scores, hits, strict)[0].tolist() == [False, False]


def test_decide_on_a_large_batch() -> None:
    n = 100_000
    rng = np.random.default_rng(0)
    features = pd.DataFrame({c: np.zeros(n) for c in FEATURE_COLUMNS})
    features["count_1h"] = rng.integers(0, 8, n).astype(float)
    scores = rng.random(n)
    hits = rule_hits(features, POLICY)
    alert, reasons = decide(scores, hits, POLICY)
    burst = features["count_1h"].to_numpy() >= 5
    expected = (scores >= 0.5) | (burst & (scores >= 0.2))
    assert np.array_equal(alert, expected)
    assert sum(bool(r) for r in reasons) == int(expected.sum())
    with_rule = [r for r, b, a in zip(reasons, burst, alert, strict=True) if a and b]
    assert with_rule and all(r.endswith("; rules: velocity_burst") for r in with_rule)


def test_decide_rejects_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="2 scores for 1 rows"):
        decide(np.array([0.1, 0.2]), rule_hits(frame({}), POLICY), POLICY)


def test_policy_validates_thresholds() -> None:
    with pytest.raises(ValueError, match="rule_threshold"):
        AlertPolicy(threshold=0.3, rule_threshold=0.4)
    with pytest.raises(ValueError):
        AlertPolicy(threshold=1.5)


BLOCKED = {"card_blocked": 1.0}
NOT_OPEN = {"account_not_open": 1.0}


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (BLOCKED, ["blocked_card"]),
        (NOT_OPEN, ["account_not_open"]),
        (BLOCKED | NOT_OPEN, ["blocked_card", "account_not_open"]),
        ({"card_blocked": 0.0, "account_not_open": 0.0}, []),
        ({"card_blocked": math.nan, "account_not_open": math.nan}, []),  # no account known
        (BLOCKED | NOT_OPEN | {"is_debit": 0.0}, []),  # money coming in is no risk
        (BLOCKED | {"channel_wire": 1.0}, []),  # a wire transfer needs no card
        (NOT_OPEN | {"channel_wire": 1.0}, ["account_not_open"]),  # but a frozen account does
        (BLOCKED | {"channel_wire": math.nan}, ["blocked_card"]),  # channel unknown: may be card
    ],
)
def test_account_rules_fire_on_the_banks_facts(row: dict[str, float], expected: list[str]) -> None:
    assert fired(row) == [expected]


def test_hard_rules_alert_whatever_the_score() -> None:
    features = frame(BLOCKED, NOT_OPEN, BLOCKED, BURST, {})
    scores = np.array([0.01, 0.0, math.nan, 0.01, 0.01])
    alert, reasons = decide(scores, rule_hits(features, POLICY), POLICY)
    assert alert.tolist() == [True, True, True, False, False]
    assert reasons[:3] == [
        "model 0.01; rules: blocked_card",
        "model 0.00; rules: account_not_open",
        "model ?; rules: blocked_card",
    ]


def test_the_job_scores_and_rules_from_arrow_exactly_as_from_pandas(
    small_sim: Simulation, small_bank: AccountChanges, tiny_model: LoadedModel
) -> None:
    """`FraudScoringJob.score` and `shadow_score` score and apply the rules on the Arrow table
    (issue 11); scores, rules, alerts and reasons are bit for bit what the whole table converted
    to pandas gave, on a real simulated batch (with accounts: the hard rules fire too)."""
    features = replay(
        small_sim.transactions, small_sim.labels, accounts=account_history(small_bank)
    ).features
    shadow_model = LoadedModel(model=tiny_model.model, name=MODEL_NAME, version="shadow")
    policy = AlertPolicy(threshold=0.3, rule_threshold=0.1)  # alerts of each kind in this batch
    job = FraudScoringJob(None, model=tiny_model, challenger=shadow_model, policy=policy)
    context = ScoringContext(MODEL_NAME, tiny_model.version, challenger_version="shadow")
    now = datetime(2026, 1, 1, tzinfo=UTC)
    tables = job.score(features, context, 7, now)
    shadow = job.shadow_score(features, context, 7, now)

    # The pandas path, as the job took it before.
    frame = features.replace_schema_metadata(None).to_pandas()
    probability = score(tiny_model.model, frame)
    hits = rule_hits(frame, policy)
    alert, reasons = decide(probability, hits, policy)
    fired = hits.to_numpy()
    rules = [",".join(r for r, on in zip(RULES, row, strict=True) if on) for row in fired]

    got = tables[SCORES]
    assert got["score"].to_numpy().tobytes() == probability.tobytes()
    assert got["rules"].to_pylist() == rules
    assert got["alert"].to_pylist() == alert.tolist()
    alerts = tables[ALERTS]
    assert alerts["transaction_id"].to_pylist() == frame["transaction_id"][alert].tolist()
    assert alerts["score"].to_numpy().tobytes() == probability[alert].tobytes()
    assert alerts["reason"].to_pylist() == [r for r, a in zip(reasons, alert, strict=True) if a]
    before = score(shadow_model.model, features.select(FEATURE_COLUMNS).to_pandas())
    assert shadow["score"].to_numpy().tobytes() == before.tobytes()
    assert rule_hits(features, policy).equals(hits)
    # RULE_COLUMNS are all the rules read: given only those columns they fire exactly the same.
    assert rule_hits(features.select(list(RULE_COLUMNS)), policy).equals(hits)
    # The batch has what the comparison is about: NaN features, alerts by the score alone, by a
    # soft rule below the threshold and by a hard rule whatever the score.
    assert np.isnan(frame[FEATURE_COLUMNS].to_numpy()).any()
    soft = fired[:, [RULES.index(r) for r in SOFT_RULES]].any(axis=1)
    hard = fired.any(axis=1) & ~soft
    assert (alert & ~fired.any(axis=1)).any()
    assert (alert & soft & (probability < policy.threshold)).any()
    assert (alert & hard & (probability < policy.rule_threshold)).any()
    empty = job.score(features.slice(0, 0), context, 7, now)
    assert empty[SCORES].num_rows == empty[ALERTS].num_rows == 0
    assert job.shadow_score(features.slice(0, 0), context, 7, now).num_rows == 0
