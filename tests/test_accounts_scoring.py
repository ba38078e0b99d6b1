"""The bank's accounts (DMS changes applied as SCD 2) in the scoring: end to end, in process.

The simulated bank blocks a card after a fraud on it is reported; the fraudster retries the card
while it is blocked. The stream is scored by the in-process runner with the lake's
`accounts_history` (applied from the DMS files by the CDC code): every payment on a blocked card
alerts whatever the model says, the balance is the bank's ledger balance, and the features equal a
replay of the same history with the reference account history.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from fraud_streams import add_account_version, load_bank

from models.accounts import (
    ACCOUNTS_HISTORY,
    AccountChanges,
    account_as_of,
    account_history,
    simulate_accounts,
)
from models.features import feature_names, replay
from models.job import ALERTS, FEATURES, SCORES, ScoringContext
from models.registry import LoadedModel
from models.schema import TIMESTAMP, to_payload
from models.simulate import Simulation
from streamguard.checkpoint import CHECKPOINT_TABLE
from streamguard.lake import Lake
from streamguard.pipeline import load_labels, scoring_runner
from streamguard.sources import MemorySource
from streamguard.spark.customer_state import AccountsAsOf


@pytest.fixture(scope="module")
def bank(small_sim: Simulation) -> AccountChanges:
    return simulate_accounts(small_sim, seed=3)


@pytest.fixture(scope="module")
def scored(
    tmp_path_factory: pytest.TempPathFactory,
    small_sim: Simulation,
    bank: AccountChanges,
    tiny_model: LoadedModel,
) -> Lake:
    root = tmp_path_factory.mktemp("accounts_scoring")
    lake = Lake(root / "lake")
    load_labels(lake, small_sim.labels)
    load_bank(lake, bank, root / "dms")
    rows = small_sim.transactions.to_pylist()
    source = MemorySource.split([to_payload(r) for r in rows], [r["customer_id"] for r in rows], 2)
    scoring_runner(lake, source, None, max_batch_records=2_000, model=tiny_model).run()
    return lake


def _by_id(table: pa.Table) -> pa.Table:
    return table.sort_by("transaction_id")


def test_payments_on_blocked_cards_alert_whatever_the_score(
    scored: Lake, small_sim: Simulation, bank: AccountChanges
) -> None:
    tx = _by_id(small_sim.transactions)
    as_of = account_as_of(tx, account_history(bank))
    card_payment = pc.and_(
        pc.equal(tx["kind"], "debit"), pc.not_equal(tx["channel"], "wire")
    ).to_numpy(zero_copy_only=False)
    blocked = pc.equal(as_of["card_status"], "blocked").to_numpy(zero_copy_only=False)
    expected = set(pc.filter(tx["transaction_id"], pa.array(blocked & card_payment)).to_pylist())
    # The simulator's retries of blocked cards are all among them, and there are some.
    labels = small_sim.labels
    retries = set(
        pc.filter(
            labels["transaction_id"], pc.equal(labels["fraud_scenario"], "blocked_card")
        ).to_pylist()
    )
    assert retries and retries <= expected
    scores = _by_id(scored.read(SCORES))
    alerted = scored.read(ALERTS)
    flagged = {
        t
        for t, rules in zip(
            scores["transaction_id"].to_pylist(), scores["rules"].to_pylist(), strict=True
        )
        if "blocked_card" in rules.split(",")
    }
    assert flagged == expected
    reasons = dict(
        zip(alerted["transaction_id"].to_pylist(), alerted["reason"].to_pylist(), strict=True)
    )
    assert expected <= set(reasons)
    assert all("blocked_card" in reasons[t] for t in expected)
    # Many of them with a score the model alone would not alert on.
    low = pc.filter(scores["score"], pc.is_in(scores["transaction_id"], pa.array(list(expected))))
    assert pc.min(low).as_py() < 0.5


def test_features_see_the_account_as_of_each_event(
    scored: Lake, small_sim: Simulation, bank: AccountChanges
) -> None:
    features = _by_id(scored.read(FEATURES))
    tx = _by_id(small_sim.transactions)
    assert features["transaction_id"].equals(tx["transaction_id"])
    history = account_history(bank)
    # What a replay of the stream with the reference history computes, though the runner cut
    # other batches and read the history the CDC code applied from the DMS files (sums of
    # amounts may round differently when the batches are cut elsewhere).
    reference = _by_id(replay(small_sim.transactions, small_sim.labels, accounts=history).features)
    # Customer and event features (the terminal ones depend on how the two shards interleave).
    for name in feature_names("customer", "event"):
        a, b = (
            features[name].to_numpy(zero_copy_only=False),
            reference[name].to_numpy(zero_copy_only=False),
        )
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-6, equal_nan=True, err_msg=name)
    as_of = account_as_of(tx, history)
    blocked = pc.equal(as_of["card_status"], "blocked").to_numpy(zero_copy_only=False)
    assert (features["card_blocked"].to_numpy(zero_copy_only=False) == 1.0).sum() == blocked.sum()
    assert blocked.sum() > 0
    # The balance follows the ledger: right after a posting, the balance before the customer's
    # next event is the posted balance (nothing happened between).
    times = tx["event_time"].cast(pa.int64()).to_numpy()
    posted = as_of["account_updated_at"].cast(pa.int64()).to_numpy(zero_copy_only=False)
    ledger = as_of["account_balance"].to_numpy(zero_copy_only=False)
    before = features["balance_before"].to_numpy(zero_copy_only=False)
    frame = pa.table({"c": tx["customer_id"], "t": times}).to_pandas()
    frame["row"] = np.arange(len(frame))
    frame = frame.sort_values(["c", "t", "row"])
    previous = frame.groupby("c")["t"].shift(1).to_numpy()
    rows = frame["row"].to_numpy()
    first_after = ~np.isnan(posted[rows].astype(float)) & (posted[rows] > previous)
    assert first_after.sum() > 100
    np.testing.assert_array_equal(before[rows][first_after], ledger[rows][first_after])


def test_each_batch_recorded_the_accounts_version_it_read(scored: Lake) -> None:
    contexts = scored.read(CHECKPOINT_TABLE, columns=["context"])["context"].to_pylist()
    versions = {ScoringContext.from_json(c).accounts_version for c in contexts if c}
    assert versions == {scored.version(ACCOUNTS_HISTORY)}


def test_without_accounts_history_nothing_is_looked_up(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel
) -> None:
    lake = Lake(tmp_path / "lake")
    rows = small_sim.transactions.slice(0, 500).to_pylist()
    source = MemorySource.split([to_payload(r) for r in rows], [r["customer_id"] for r in rows], 2)
    scoring_runner(lake, source, None, model=tiny_model).run()
    features = lake.read(FEATURES)
    assert features["card_blocked"].null_count == features.num_rows
    contexts = lake.read(CHECKPOINT_TABLE, columns=["context"])["context"].to_pylist()
    assert {ScoringContext.from_json(c).accounts_version for c in contexts if c} == {None}


def test_the_state_store_executors_read_the_version_of_the_batch_time(tmp_path: Path) -> None:
    """`AccountsAsOf` (the Spark state-store executors' lookup): the last version committed by
    the batch's processing time, so a replay with the same time reads the same version."""
    lake = Lake(tmp_path / "lake")
    uri = str(lake.path(ACCOUNTS_HISTORY))
    assert AccountsAsOf(uri).at(int(time.time() * 1000)) is None  # no table yet
    before_first = int(time.time() * 1000) - 60_000
    add_account_version(lake, 0)
    time.sleep(0.05)
    after_first = int(time.time() * 1000)
    time.sleep(0.05)
    add_account_version(lake, 1, card_status="blocked", valid_from=datetime(2026, 1, 2, tzinfo=UTC))
    accounts = AccountsAsOf(uri)
    assert accounts.at(before_first) is None  # nothing committed by then
    first = accounts.at(after_first)
    assert first is not None and first.version() == 0
    latest = accounts.at(int(time.time() * 1000))
    assert latest is not None and latest.version() == 1
    tx = pa.table(
        {
            "customer_id": ["C1"],
            "event_time": pa.array([datetime(2026, 1, 3, tzinfo=UTC)], TIMESTAMP),
        }
    )
    looked, version = AccountsAsOf(uri).lookup(tx, after_first)
    assert version == 0 and looked["card_status"].to_pylist() == ["active"]
