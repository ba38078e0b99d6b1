"""The synthetic transaction generator: contracts, determinism and its fraud scenarios."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.schema import CHANNELS, KINDS, LABEL_SCHEMA, TRANSACTION_SCHEMA
from models.simulate import (
    BLOCK_KINDS,
    BLOCK_REASONS,
    CUSTOMER_DAYS,
    CUSTOMER_FACTOR,
    FRAUD_SCENARIOS,
    OVER_THRESHOLD_DOLLARS,
    TERMINAL_28D_DAYS,
    Simulation,
    simulate,
    write_simulation,
)

DAYS, CUSTOMERS, SEED = 45, 400, 3
START = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def sim() -> Simulation:
    return simulate(days=DAYS, customers=CUSTOMERS, seed=SEED)


@pytest.fixture(scope="module")
def frame(sim: Simulation) -> pd.DataFrame:
    """Transactions in stream order with their label and the balance before each one."""
    df = sim.transactions.to_pandas()
    labels = sim.labels.to_pandas()[["transaction_id", "fraud_scenario", "reported_at"]]
    df = df.merge(labels, on="transaction_id", how="left", validate="one_to_one")
    df["scenario"] = df["fraud_scenario"].fillna("legit")
    cents = np.rint(df["amount"].to_numpy() * 100).astype(np.int64)
    df["signed"] = np.where(df["kind"] == "debit", -cents, cents)
    df["balance_after"] = df.groupby("customer_id", sort=False)["signed"].cumsum()
    df["balance_before"] = df["balance_after"] - df["signed"]
    return df


@pytest.fixture(scope="module")
def demo() -> pd.DataFrame:
    """The demo's size (60 days x 1,000 customers, seed 7), transactions with their scenario."""
    sim = simulate(days=60, customers=1000, seed=7)
    df = sim.transactions.to_pandas()
    labels = sim.labels.to_pandas()[["transaction_id", "fraud_scenario"]]
    df = df.merge(labels, on="transaction_id", how="left", validate="one_to_one")
    df["scenario"] = df["fraud_scenario"].fillna("legit")
    return df


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_same_seed_gives_byte_identical_tables() -> None:
    a = simulate(days=15, customers=120, seed=11)
    b = simulate(days=15, customers=120, seed=11)
    assert a.transactions.equals(b.transactions)
    assert a.labels.equals(b.labels)
    assert _ipc_bytes(a.transactions) == _ipc_bytes(b.transactions)
    assert _ipc_bytes(a.labels) == _ipc_bytes(b.labels)


def test_different_seed_gives_different_data() -> None:
    a = simulate(days=15, customers=120, seed=11)
    b = simulate(days=15, customers=120, seed=12)
    assert not a.transactions.equals(b.transactions)
    # Not just the ids: the activity itself differs.
    assert a.transactions.drop_columns(["transaction_id"]) != b.transactions.drop_columns(
        ["transaction_id"]
    )
    assert a.transactions["amount"].to_pylist()[:50] != b.transactions["amount"].to_pylist()[:50]


def test_schemas_are_exactly_the_contracts(sim: Simulation) -> None:
    assert sim.transactions.schema.equals(TRANSACTION_SCHEMA, check_metadata=True)
    assert sim.labels.schema.equals(LABEL_SCHEMA, check_metadata=True)
    for name in ("transaction_id", "event_time", "customer_id", "terminal_id", "amount", "kind"):
        assert sim.transactions[name].null_count == 0, name
    assert sim.labels["fraud_scenario"].null_count == 0


def test_ids_unique_times_sorted_amounts_in_cents(frame: pd.DataFrame) -> None:
    assert frame["transaction_id"].is_unique
    assert frame["transaction_id"].str.fullmatch(rf"tx-{SEED}-\d{{9}}").all()
    assert frame["event_time"].is_monotonic_increasing
    assert frame["event_time"].min() == pd.Timestamp(START)
    assert frame["event_time"].max() < pd.Timestamp(START + timedelta(days=DAYS))
    amount = frame["amount"].to_numpy()
    assert (amount > 0).all()
    np.testing.assert_allclose(amount, np.round(amount, 2), rtol=0, atol=1e-9)


def test_values_follow_the_vocabulary(frame: pd.DataFrame, sim: Simulation) -> None:
    assert set(frame["kind"]) == set(KINDS)
    assert set(frame["channel"].dropna()) == set(CHANNELS)
    assert frame["customer_id"].str.fullmatch(r"C\d{6}").all()
    assert frame["terminal_id"].str.fullmatch(r"T\d{5}").all()
    assert frame["location"].dropna().str.fullmatch(r"L\d{4,}").all()
    assert frame["customer_id"].nunique() == CUSTOMERS
    # Default terminal count: one per five customers, at least 20.
    assert frame["terminal_id"].nunique() <= max(20, CUSTOMERS // 5)
    per_customer_day = len(frame) / CUSTOMERS / DAYS
    assert 1.5 <= per_customer_day <= 4.0


def test_daily_pattern(frame: pd.DataFrame) -> None:
    legit = frame[(frame["scenario"] == "legit") & (frame["kind"] == "debit")]
    share = np.bincount(legit["event_time"].dt.hour, minlength=24) / len(legit)
    assert share[1:5].sum() < 0.05  # quiet nights
    assert share[10:20].sum() > 0.5  # busy days
    assert share[18] > 3 * share[3]


def test_locations_present_only_in_person(frame: pd.DataFrame) -> None:
    in_person = frame["channel"].isin(["atm", "pos"])
    assert frame.loc[in_person, "location"].notna().all()
    assert frame.loc[~in_person, "location"].isna().all()
    assert frame.loc[frame["channel"] == "online", "location"].isna().any()
    # Each terminal is one kind of place: one channel, at most one location.
    per_terminal = frame.groupby("terminal_id").agg(
        channels=("channel", "nunique"), locations=("location", "nunique")
    )
    assert (per_terminal["channels"] == 1).all()
    assert (per_terminal["locations"] <= 1).all()


def test_first_transaction_is_the_opening_credit(frame: pd.DataFrame) -> None:
    first = frame.groupby("customer_id", sort=False).head(1)
    assert len(first) == CUSTOMERS
    assert (first["kind"] == "credit").all()
    assert (first["channel"] == "wire").all()
    assert (first["event_time"] == pd.Timestamp(START)).all()
    assert (first["scenario"] == "legit").all()


def test_balances_never_go_negative(frame: pd.DataFrame) -> None:
    legit_debits = (frame["kind"] == "debit") & (frame["scenario"] == "legit")
    assert legit_debits.sum() > 1000
    assert (frame.loc[legit_debits, "balance_after"] >= 0).all()
    assert (frame["balance_after"] >= 0).all()  # frauds drain at most to zero
    # The balance really binds: some legit debits leave the account nearly empty.
    assert (frame.loc[legit_debits, "balance_after"] < 5000).any()


def test_fraud_rate_is_low_and_every_scenario_present(sim: Simulation) -> None:
    labels = sim.labels.to_pandas()
    rate = len(labels) / sim.transactions.num_rows
    assert 0 < rate < 0.02
    assert labels["is_fraud"].all()
    assert set(labels["fraud_scenario"]) == set(FRAUD_SCENARIOS)
    assert labels["transaction_id"].is_unique


def test_labels_refer_to_transactions_and_are_reported_later(frame: pd.DataFrame) -> None:
    fraud = frame[frame["fraud_scenario"].notna()]
    labels_total = fraud["reported_at"].notna().sum()
    assert labels_total == len(fraud) > 0
    delay_days = (fraud["reported_at"] - fraud["event_time"]).dt.total_seconds() / 86_400
    assert (delay_days > 0).all()
    assert delay_days.max() <= 28
    assert 2 <= delay_days.median() <= 6  # median a few days, a tail of weeks
    assert delay_days.quantile(0.95) > 7
    assert (frame.loc[frame["fraud_scenario"].isna(), "reported_at"].isna()).all()


def test_labels_only_for_existing_transactions(sim: Simulation) -> None:
    ids = set(sim.transactions["transaction_id"].to_pylist())
    assert set(sim.labels["transaction_id"].to_pylist()) <= ids


def test_drain_takes_most_of_the_balance(frame: pd.DataFrame, sim: Simulation) -> None:
    drains = frame[frame["scenario"] == "low_balance_drain"]
    # Drains are settled against the balance before card blocks remove the customer's declined
    # debits; after a block the customer has more left than the drain was sized for.
    first_block = sim.blocks.to_pandas().groupby("customer_id")["start_at"].min()
    block = drains["customer_id"].map(first_block)
    drains = drains[block.isna() | (drains["event_time"] < block)]
    assert len(drains) > 0
    assert (drains["kind"] == "debit").all()
    assert (drains["channel"] == "atm").all()
    ratio = np.rint(drains["amount"] * 100) / drains["balance_before"]
    assert (ratio >= 0.85).all()
    assert (ratio <= 1.0).all()
    assert (drains["balance_before"] <= 150_000).all()  # at most what an ATM lets a thief take
    # "Low": below the typical balance legit debits see.
    legit = frame[(frame["kind"] == "debit") & (frame["scenario"] == "legit")]
    assert drains["balance_before"].median() < 0.5 * legit["balance_before"].median()


def test_new_location_is_somewhere_never_seen_and_large(frame: pd.DataFrame) -> None:
    frauds = frame[frame["scenario"] == "new_location"]
    assert len(frauds) > 0
    assert (frauds["channel"] == "pos").all()
    for customer, rows in frauds.groupby("customer_id"):
        first = rows.index[0]
        earlier = frame.loc[: first - 1]
        seen = set(earlier.loc[earlier["customer_id"] == customer, "location"].dropna())
        assert frame.at[first, "location"] not in seen
    legit_pos = frame[(frame["channel"] == "pos") & (frame["scenario"] == "legit")]
    usual = legit_pos.groupby("customer_id")["amount"].median()
    ratio = frauds["amount"].to_numpy() / usual.reindex(frauds["customer_id"]).to_numpy()
    assert np.nanmedian(ratio) > 2


def test_legit_new_places_are_rare_but_happen(frame: pd.DataFrame) -> None:
    in_person = frame[frame["location"].notna() & (frame["scenario"] == "legit")].copy()
    in_person["seen"] = in_person.groupby(["customer_id", "location"]).cumcount() > 0
    settled = in_person[in_person["event_time"] >= pd.Timestamp(START + timedelta(days=14))]
    assert 1 - settled["seen"].mean() < 0.06  # once habits formed, a new place is unusual
    # Travel: places a customer goes to only once are a small but real share of in-person use.
    visits = in_person.groupby(["customer_id", "location"])["transaction_id"].transform("size")
    assert 0.008 < (visits == 1).mean() < 0.05


def test_compromised_terminal_takes_everything_in_its_window(frame: pd.DataFrame) -> None:
    frauds = frame[frame["scenario"] == "compromised_terminal"]
    assert len(frauds) > 0
    assert frauds["channel"].isin(["atm", "pos"]).all()
    for terminal, rows in frauds.groupby("terminal_id"):
        lo, hi = rows["event_time"].min(), rows["event_time"].max()
        at = frame[
            (frame["terminal_id"] == terminal)
            & (frame["event_time"] >= lo)
            & (frame["event_time"] <= hi)
        ]
        assert (at["scenario"] != "legit").all()
        assert rows["customer_id"].nunique() > 1  # many customers' cards were skimmed there
    # Legit-looking amounts: the same ballpark as legit in-person debits.
    legit = frame[frame["channel"].isin(["atm", "pos"]) & (frame["scenario"] == "legit")]
    assert frauds["amount"].median() < 3 * legit["amount"].median()


def test_card_not_present_inflates_online_spending(frame: pd.DataFrame) -> None:
    frauds = frame[frame["scenario"] == "card_not_present"]
    assert len(frauds) > 0
    assert (frauds["channel"] == "online").all()
    assert frauds["location"].isna().all()
    for _, rows in frauds.groupby("customer_id"):
        assert rows["event_time"].max() - rows["event_time"].min() <= pd.Timedelta(days=18)
    legit_debits = frame[(frame["kind"] == "debit") & (frame["scenario"] == "legit")]
    usual = legit_debits.groupby("customer_id")["amount"].median()
    ratio = frauds["amount"].to_numpy() / usual.reindex(frauds["customer_id"]).to_numpy()
    assert np.nanmedian(ratio) > 2.5


def test_card_testing_is_a_burst_of_small_purchases(frame: pd.DataFrame) -> None:
    frauds = frame[frame["scenario"] == "card_testing"]
    assert len(frauds) > 0
    assert (frauds["channel"] == "online").all()
    assert (frauds["amount"] <= 5.0).all()
    sizes = []
    for _, rows in frauds.groupby("customer_id"):
        assert rows["event_time"].max() - rows["event_time"].min() <= pd.Timedelta(minutes=5)
        assert rows["terminal_id"].nunique() == 1
        sizes.append(len(rows))
    assert max(sizes) <= 15
    assert np.median(sizes) >= 5


def test_terminals_argument_and_start() -> None:
    start = datetime(2025, 6, 1, 12, tzinfo=UTC)
    sim = simulate(days=5, customers=60, seed=1, terminals=30, start=start)
    times = sim.transactions["event_time"].to_pylist()
    assert times[0] == start
    assert times[-1] < start + timedelta(days=5)
    assert len(set(sim.transactions["terminal_id"].to_pylist())) <= 30


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="time-zone"):
        simulate(days=2, customers=5, seed=0, start=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="days"):
        simulate(days=0, customers=5, seed=0)
    with pytest.raises(ValueError, match="terminals"):
        simulate(days=2, customers=5, seed=0, terminals=3)


def test_write_simulation_round_trips(sim: Simulation, tmp_path: Path) -> None:
    tx_path, labels_path = write_simulation(sim, tmp_path / "out")
    assert tx_path == tmp_path / "out" / "transactions.parquet"
    assert labels_path == tmp_path / "out" / "labels.parquet"
    transactions = pq.read_table(tx_path)
    labels = pq.read_table(labels_path)
    assert transactions.schema.equals(TRANSACTION_SCHEMA)
    assert labels.schema.equals(LABEL_SCHEMA)
    assert transactions.equals(sim.transactions)
    assert labels.equals(sim.labels)


def test_drains_and_new_locations_happen_every_week(demo: pd.DataFrame) -> None:
    """The default demo data: each week after the warm-up has enough of the seeded scenarios.

    A backtest tests one week after 30 days of history, so the recall per scenario needs drains
    and new-location frauds in every week, not bunched at the start.
    """
    frauds = demo[demo["fraud_scenario"].notna()]
    assert len(frauds) / len(demo) < 0.02
    day = (frauds["event_time"] - pd.Timestamp(START)).dt.days
    for first in range(14, 60 - 6, 7):
        week = frauds.loc[(day >= first) & (day < first + 7), "fraud_scenario"]
        assert (week == "low_balance_drain").sum() >= 5, first
        assert (week == "new_location").sum() >= 5, first


def test_blocks_decline_the_customers_debits_and_fraudsters_retry_blocked_cards(
    frame: pd.DataFrame, sim: Simulation
) -> None:
    blocks = sim.blocks.to_pandas()
    assert set(blocks["reason"]) == set(BLOCK_REASONS)
    assert set(blocks["blocks"]) == set(BLOCK_KINDS)
    # A card is blocked 5-60 minutes after the first report of a fraud on it, for 3-7 days.
    fraud = frame[frame["fraud_scenario"].notna()]
    first_report = fraud.groupby("customer_id")["reported_at"].min()
    reported = blocks[blocks["reason"] == "fraud_reported"].set_index("customer_id")
    end = pd.Timestamp(START + timedelta(days=DAYS))
    surely = set(first_report[first_report < end - timedelta(hours=1)].index)
    assert surely <= set(reported.index) <= set(first_report[first_report < end].index)
    delay = reported["start_at"] - first_report.loc[reported.index]
    assert delay.between(timedelta(minutes=5), timedelta(minutes=60)).all()
    length = reported["end_at"] - reported["start_at"]
    assert length.between(timedelta(days=3), timedelta(days=7)).all()
    # During a block the customer's own debits of that kind never happen; credits still arrive.
    legit = frame[frame["scenario"] == "legit"]
    credits_inside = 0
    for block in blocks.itertuples():
        mine = legit[
            (legit["customer_id"] == block.customer_id)
            & (legit["event_time"] >= block.start_at)
            & (legit["event_time"] < block.end_at)
        ]
        debits = mine[mine["kind"] == "debit"]
        if block.blocks == "card":
            assert (debits["channel"] == "wire").all(), block
        else:
            assert debits.empty, block
        credits_inside += int((mine["kind"] == "credit").sum())
    assert credits_inside > 0
    # The fraudsters' retries: online debits on a card blocked after a report, within 2 days.
    retries = frame[frame["scenario"] == "blocked_card"]
    assert len(retries) > 0
    assert ((retries["kind"] == "debit") & (retries["channel"] == "online")).all()
    start = retries["customer_id"].map(reported["start_at"])
    assert (retries["event_time"] > start).all()
    assert (retries["event_time"] <= start + timedelta(days=2)).all()


# --------------------------------------------------------------------------- the literature's


def test_every_card_payment_above_the_threshold_is_fraud(demo: pd.DataFrame) -> None:
    card = (demo["kind"] == "debit") & demo["channel"].isin(["atm", "pos", "online"])
    above = card & (demo["amount"] > OVER_THRESHOLD_DOLLARS)
    assert above.sum() > 20
    assert (demo.loc[above, "scenario"] != "legit").all()
    frauds = demo[demo["scenario"] == "amount_over_threshold"]
    assert len(frauds) > 10
    assert (frauds["amount"] > OVER_THRESHOLD_DOLLARS).all()
    assert (frauds["kind"] == "debit").all() and frauds["channel"].isin(
        ["atm", "pos", "online"]
    ).all()
    # Only card payments: wire transfers above it stay legitimate, and so do credits.
    wire = (demo["channel"] == "wire") & (demo["amount"] > OVER_THRESHOLD_DOLLARS)
    assert (demo.loc[wire, "scenario"] == "legit").sum() > 100
    # A rare event, as in the literature (about 0.1 % of the transactions).
    assert len(frauds) / len(demo) < 0.003


def test_compromised_terminal_28d_takes_every_payment_for_weeks(demo: pd.DataFrame) -> None:
    frauds = demo[demo["scenario"] == "compromised_terminal_28d"]
    assert len(frauds) > 50
    assert frauds["channel"].isin(["atm", "pos", "online"]).all()
    spans = []
    for terminal, rows in frauds.groupby("terminal_id"):
        lo, hi = rows["event_time"].min(), rows["event_time"].max()
        at = demo[
            (demo["terminal_id"] == terminal)
            & (demo["event_time"] >= lo)
            & (demo["event_time"] <= hi)
        ]
        assert (at["scenario"] != "legit").all(), terminal
        assert hi - lo < pd.Timedelta(days=TERMINAL_28D_DAYS)
        # The terminal was used legitimately outside its window.
        assert (demo.loc[demo["terminal_id"] == terminal, "scenario"] == "legit").any()
        assert rows["customer_id"].nunique() > 1
        spans.append(hi - lo)
    assert max(spans) > pd.Timedelta(days=14)  # weeks, not a day


def test_compromised_customer_pays_five_times_as_much_on_a_third(demo: pd.DataFrame) -> None:
    frauds = demo[demo["scenario"] == "compromised_customer"]
    assert len(frauds) > 30
    assert (frauds["kind"] == "debit").all() and frauds["channel"].isin(
        ["atm", "pos", "online"]
    ).all()
    cents = np.rint(frauds["amount"].to_numpy() * 100).astype(np.int64)
    assert (cents % CUSTOMER_FACTOR == 0).all()  # a legit amount multiplied, never capped
    card = demo[(demo["kind"] == "debit") & (demo["channel"] != "wire")]
    legit = card[card["scenario"] == "legit"]
    usual = legit.groupby(["customer_id", "channel"])["amount"].median()
    keys = pd.MultiIndex.from_frame(frauds[["customer_id", "channel"]])
    ratio = frauds["amount"].to_numpy() / usual.reindex(keys).to_numpy()
    assert 3.5 < np.nanmedian(ratio) < 7
    hit = in_window = 0
    for customer, rows in frauds.groupby("customer_id"):
        lo, hi = rows["event_time"].min(), rows["event_time"].max()
        assert hi - lo < pd.Timedelta(days=CUSTOMER_DAYS)
        mine = card[(card["customer_id"] == customer) & card["event_time"].between(lo, hi)]
        hit, in_window = hit + len(rows), in_window + len(mine)
    assert 0.2 < hit / in_window < 0.6  # about a third (the window's ends are frauds)
