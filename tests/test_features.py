"""The stateful feature function on hand-computed cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from models.features import (
    CUSTOMER_FEATURES,
    CUSTOMER_STATE_SCHEMA,
    ENTITIES,
    EVENT_FEATURES,
    FEATURE_COLUMNS,
    FEATURE_SCHEMA,
    FEATURES,
    KEY_COLUMNS,
    KNOWN_FRAUD_SCHEMA,
    TERMINAL_DAYS,
    TERMINAL_FEATURES,
    TERMINAL_STATE_SCHEMA,
    FeatureState,
    compute_features,
    feature_names,
    known_frauds,
    replay,
    time_chunks,
)
from models.schema import FEATURE_INPUT_SCHEMA, LABEL_SCHEMA, TRANSACTION_SCHEMA

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def tx(
    tid: str,
    minutes: float,
    customer: str = "c1",
    terminal: str = "t1",
    amount: float = 10.0,
    kind: str = "debit",
    channel: str | None = "pos",
    location: str | None = "L1",
) -> dict:
    return {
        "transaction_id": tid,
        "event_time": T0 + timedelta(minutes=minutes),
        "customer_id": customer,
        "terminal_id": terminal,
        "amount": amount,
        "kind": kind,
        "channel": channel,
        "location": location,
    }


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TRANSACTION_SCHEMA)


def by_id(result_table: pa.Table) -> dict[str, dict]:
    return {r["transaction_id"]: r for r in result_table.to_pylist()}


def test_balance_windows_locations_by_hand() -> None:
    rows = [
        tx("a", 0, amount=1000.0, kind="credit", channel="wire", location=None),
        tx("b", 10, amount=100.0, location="L1"),
        tx("c", 30, amount=300.0, channel="atm", location="L2"),
        tx("d", 120, amount=50.0, location="L1"),
        tx("e", 35, customer="c2", amount=20.0, channel=None),
    ]
    result = compute_features(table(rows), FeatureState.empty())
    assert result.features.schema == FEATURE_SCHEMA
    f = by_id(result.features)
    # Running balance before each debit and the amount/balance ratio.
    assert [f[t]["balance_before"] for t in "abcd"] == [0.0, 1000.0, 900.0, 600.0]
    assert f["c"]["amount_balance_ratio"] == pytest.approx(300 / 900)
    assert f["e"]["amount_balance_ratio"] == pytest.approx(20.0)  # balance 0 -> amount / 1
    # Spend windows count earlier debits: c sees b (the credit a does not count); d (2 h
    # later) sees nothing within the hour, b and c within the day.
    assert f["c"]["count_1h"] == 1 and f["c"]["mean_amount_1h"] == pytest.approx(100.0)
    assert f["d"]["count_1h"] == 0 and f["d"]["mean_amount_1h"] is None
    assert f["d"]["count_1d"] == 2 and f["d"]["mean_amount_1d"] == pytest.approx(200.0)
    assert f["d"]["amount_to_mean_30d"] == pytest.approx(50 / 200)
    # Locations: no location -> NaN; first L1 unseen; L1 again seen; count of distinct before.
    assert f["a"]["location_seen_before"] is None
    assert (f["b"]["location_seen_before"], f["c"]["location_seen_before"]) == (0.0, 0.0)
    assert f["d"]["location_seen_before"] == 1.0 and f["d"]["n_locations_seen"] == 2
    assert f["b"]["seconds_since_prev"] == 600 and f["a"]["seconds_since_prev"] is None
    # Channel one-hot is NaN when the channel is absent.
    assert f["c"]["channel_atm"] == 1.0 and f["c"]["channel_pos"] == 0.0
    assert f["e"]["channel_pos"] is None
    # Other customers do not leak into c1's windows.
    assert f["e"]["count_1d"] == 0
    customers = {r["customer_id"]: r for r in result.state.customers.to_pylist()}
    assert customers["c1"]["balance"] == pytest.approx(550.0)
    assert customers["c1"]["locations"] == ["L1", "L2"]
    assert customers["c1"]["n_transactions"] == 4
    assert customers["c1"]["history_amounts"] == [100.0, 300.0, 50.0]  # debits only


def test_within_batch_order_follows_event_time_not_arrival() -> None:
    # Arrival order d, c, b, a; each must still see only the transactions before it in time.
    rows = [
        tx("d", 30, amount=4.0),
        tx("c", 20, amount=3.0),
        tx("b", 10, amount=2.0),
        tx("a", 0, amount=1.0, kind="credit"),
    ]
    f = by_id(compute_features(table(rows), FeatureState.empty()).features)
    assert [f[t]["count_1h"] for t in "abcd"] == [0, 0, 1, 2]  # the credit a is not spend
    assert [f[t]["balance_before"] for t in "abcd"] == [0.0, 1.0, -1.0, -4.0]
    # Equal event times: arrival order breaks the tie.
    tie = by_id(compute_features(table([tx("x", 5), tx("y", 5)]), FeatureState.empty()).features)
    assert (tie["x"]["count_1h"], tie["y"]["count_1h"]) == (0, 1)


@pytest.mark.parametrize("split", [1, 2, 3, 4])
def test_batches_equal_one_batch(split: int) -> None:
    rows = [
        tx(
            f"t{i}",
            i * 47,
            customer=f"c{i % 2}",
            terminal=f"k{i % 3}",
            amount=5.0 + i,
            location=f"L{i % 4}",
            kind="credit" if i % 5 == 0 else "debit",
        )
        for i in range(12)
    ]
    frauds = pa.Table.from_pylist(
        [
            {
                "terminal_id": "k1",
                "event_time": T0 + timedelta(minutes=47),
                "reported_at": T0 + timedelta(minutes=200),
            }
        ],
        schema=KNOWN_FRAUD_SCHEMA,
    )
    whole = compute_features(table(rows), FeatureState.empty(), frauds).features
    state, parts = FeatureState.empty(), []
    for i in range(0, len(rows), split):
        r = compute_features(table(rows[i : i + split]), state, frauds)
        parts.append(r.features)
        state = state.updated(r.state)
    assert pa.concat_tables(parts).equals(whole)


def test_terminal_fraud_rate_respects_label_delay() -> None:
    rows = [
        tx("f", 0, terminal="k", customer="x"),
        tx("g", 60, terminal="k", customer="y"),
        tx("h", 180, terminal="k", customer="z"),
        tx("i", 240, terminal="k", customer="w"),
    ]
    # f was fraud, reported at minute 120: g (before the report) must not know; h and i do.
    frauds = pa.Table.from_pylist(
        [{"terminal_id": "k", "event_time": T0, "reported_at": T0 + timedelta(minutes=120)}],
        schema=KNOWN_FRAUD_SCHEMA,
    )
    f = by_id(compute_features(table(rows), FeatureState.empty(), frauds).features)
    assert f["f"]["terminal_fraud_rate_1d"] is None  # no earlier transaction at k
    assert f["g"]["terminal_fraud_rate_1d"] == 0.0
    assert f["h"]["terminal_fraud_rate_1d"] == pytest.approx(1 / 2)
    assert f["i"]["terminal_fraud_rate_1d"] == pytest.approx(1 / 3)
    assert f["i"]["terminal_tx_count_1d"] == 3


def test_replay_with_all_labels_leaks_no_future_label() -> None:
    rows = [tx(f"r{i}", i * 60 * 24, customer=f"c{i}", terminal="k") for i in range(10)]
    labels = pa.Table.from_pylist(
        [
            {
                "transaction_id": "r2",
                "is_fraud": True,
                "reported_at": T0 + timedelta(days=6, minutes=1),
                "fraud_scenario": "x",
            }
        ],
        schema=LABEL_SCHEMA,
    )
    t = table(rows)
    assert known_frauds(t, labels).num_rows == 1
    f = by_id(replay(t, labels).features)
    # r2 happened on day 2 but was reported on day 6: days 3..6 cannot know, 7+ do.
    for i in range(3, 7):
        assert f[f"r{i}"]["terminal_fraud_rate_7d"] == 0.0
    # Terminal windows are calendar days: "7d" is the event's day so far and the 7 days before.
    # r7 sees days 0..6, r8 days 1..7, r9 days 2..8 (r2 still in: day 2 is 7 days back).
    assert f["r7"]["terminal_fraud_rate_7d"] == pytest.approx(1 / 7)
    assert f["r8"]["terminal_fraud_rate_7d"] == pytest.approx(1 / 7)
    assert f["r9"]["terminal_fraud_rate_7d"] == pytest.approx(1 / 7)
    assert f["r9"]["terminal_tx_count_7d"] == 7
    assert f["r8"]["terminal_fraud_rate_30d"] == pytest.approx(1 / 8)
    assert f["r9"]["terminal_tx_count_1d"] == 1  # yesterday's r8; r2 is out of "1d"
    assert f["r9"]["terminal_fraud_rate_1d"] == 0.0


def test_state_history_is_pruned_to_the_longest_window() -> None:
    rows = [tx("old", 0, amount=7.0), tx("new", 60 * 24 * 40, amount=9.0)]
    result = compute_features(table(rows), FeatureState.empty())
    f = by_id(result.features)
    assert f["new"]["count_30d"] == 0  # 40 days later the old one is out of every window
    (state,) = result.state.customers.to_pylist()
    assert state["history_amounts"] == [9.0]
    assert state["n_transactions"] == 2


def test_empty_batch_and_time_chunks() -> None:
    empty = compute_features(table([]), FeatureState.empty())
    assert empty.features.num_rows == 0 and empty.features.schema == FEATURE_SCHEMA
    chunks = list(time_chunks(table([tx("a", 0), tx("b", 60 * 25), tx("c", 60 * 26)])))
    assert [c.num_rows for c in chunks] == [1, 2]
    with pytest.raises(ValueError, match="sorted"):
        list(time_chunks(table([tx("a", 10), tx("b", 0)])))


def test_every_feature_is_declared_once_with_its_entity() -> None:
    names = [f.name for f in FEATURES]
    assert names == FEATURE_COLUMNS and len(set(names)) == len(names)
    assert {f.entity for f in FEATURES} <= set(ENTITIES)
    assert all(f.description for f in FEATURES)
    split = CUSTOMER_FEATURES + TERMINAL_FEATURES + EVENT_FEATURES
    assert sorted(split) == sorted(FEATURE_COLUMNS) and len(split) == len(FEATURE_COLUMNS)
    assert feature_names(*ENTITIES) == FEATURE_COLUMNS
    assert FEATURE_SCHEMA.names == KEY_COLUMNS + FEATURE_COLUMNS
    # The order is part of the model contract (FEATURE_VERSION): models read columns by position.
    assert [
        "amount",
        "is_debit",
        "balance_before",
        "amount_balance_ratio",
        "location_seen_before",
        "n_locations_seen",
        "seconds_since_prev",
        *[f"{s}_{w}" for w in ("1h", "1d", "7d", "30d") for s in ("count", "mean_amount")],
        "amount_to_mean_7d",
        "amount_to_mean_30d",
        "velocity_1d_to_30d",
        *[f"terminal_{s}_{w}" for w in ("1d", "7d", "30d") for s in ("tx_count", "fraud_rate")],
        *[f"terminal_{s}_{w}_delayed" for w in ("1d", "7d", "30d") for s in ("tx_count", "risk")],
        "channel_atm",
        "channel_pos",
        "channel_online",
        "channel_wire",
        "hour_of_day",
        "is_weekend",
        "is_night",
        "card_blocked",
        "account_not_open",
    ] == FEATURE_COLUMNS
    # The Spark executors' two parts: by customer (with the event features), by terminal.
    assert feature_names("customer", "event") == [
        c for c in FEATURE_COLUMNS if not c.startswith("terminal_")
    ]
    assert [c for c in FEATURE_COLUMNS if c.startswith("terminal_")] == TERMINAL_FEATURES
    with pytest.raises(ValueError, match="unknown entities"):
        feature_names("merchant")  # type: ignore[arg-type]


def test_each_part_needs_only_its_entitys_state() -> None:
    # What a by-key executor relies on: customer and event features from the customer state
    # alone, terminal features from the terminal state and known frauds alone.
    rows = [
        tx(f"h{i}", i * 90, customer=f"c{i % 3}", terminal=f"k{i % 2}", location=f"L{i % 5}")
        for i in range(9)
    ]
    frauds = pa.Table.from_pylist(
        [{"terminal_id": "k1", "event_time": T0, "reported_at": T0 + timedelta(minutes=100)}],
        schema=KNOWN_FRAUD_SCHEMA,
    )
    state = compute_features(table(rows[:6]), FeatureState.empty(), frauds).state
    batch = table(rows[6:])
    whole = compute_features(batch, state, frauds).features
    by_customer = compute_features(
        batch, FeatureState(state.customers, TERMINAL_STATE_SCHEMA.empty_table())
    ).features
    by_terminal = compute_features(
        batch, FeatureState(CUSTOMER_STATE_SCHEMA.empty_table(), state.terminals), frauds
    ).features
    customer_part = feature_names("customer", "event")
    assert by_customer.select(customer_part).equals(whole.select(customer_part))
    assert by_terminal.select(TERMINAL_FEATURES).equals(whole.select(TERMINAL_FEATURES))


def with_ledger(
    rows: list[dict], ledger: dict[str, tuple[float, float, str, str] | None]
) -> pa.Table:
    """Transactions with the bank's account as of each: tid -> (balance, minutes it was
    committed, account status, card status), None for no account known."""
    accounts = [ledger.get(r["transaction_id"]) for r in rows]
    columns = {
        "account_balance": [None if a is None else a[0] for a in accounts],
        "account_updated_at": [
            None if a is None else T0 + timedelta(minutes=a[1]) for a in accounts
        ],
        "account_status": [None if a is None else a[2] for a in accounts],
        "card_status": [None if a is None else a[3] for a in accounts],
    }
    return pa.Table.from_pylist(
        [r | {k: v[i] for k, v in columns.items()} for i, r in enumerate(rows)],
        schema=FEATURE_INPUT_SCHEMA,
    )


def stored_customer(customer: str, balance: float, last_minutes: float) -> FeatureState:
    row = {
        "customer_id": customer,
        "balance": balance,
        "last_event_time": T0 + timedelta(minutes=last_minutes),
        "n_transactions": 1,
        "locations": [],
        "history_times": [],
        "history_amounts": [],
    }
    return FeatureState(
        pa.Table.from_pylist([row], schema=CUSTOMER_STATE_SCHEMA),
        TERMINAL_STATE_SCHEMA.empty_table(),
    )


LEDGER_ROWS = [
    # c1: stored balance 500, last seen at minute 600. The ledger (posted at 1200, after c1's
    # last event) says 450: a fee the stream never showed.
    tx("a", 1500, amount=100.0),
    tx("b", 1700, amount=50.0, kind="credit", channel="wire"),
    # A new posting at 2200 (1000: a salary the stream did not carry) anchors c.
    tx("c", 2300, amount=30.0),
    tx("d", 2900, amount=20.0),  # no account version known: carries on from c
    tx(
        "e", 2250, customer="c2", terminal="t2", amount=40.0
    ),  # ledger older than c2's last event: not used
]
LEDGER = {
    "a": (450.0, 1200, "open", "active"),
    "b": (450.0, 1200, "open", "active"),
    "c": (1000.0, 2200, "open", "blocked"),
    "e": (900.0, 2000, "frozen", "active"),
}


def test_balance_re_anchors_on_the_banks_ledger_by_hand() -> None:
    state = stored_customer("c1", 500.0, 600).updated(stored_customer("c2", 200.0, 2100))
    result = compute_features(with_ledger(LEDGER_ROWS, LEDGER), state)
    f = by_id(result.features)
    assert f["a"]["balance_before"] == 450.0  # the ledger, not the stored 500
    assert f["b"]["balance_before"] == 350.0  # the ledger + a's debit after it
    assert f["c"]["balance_before"] == 1000.0  # the newer posting holds a and b already
    assert f["d"]["balance_before"] == 970.0  # carried on from c
    assert f["e"]["balance_before"] == 200.0  # c2's own running balance: the ledger is stale
    assert f["c"]["amount_balance_ratio"] == pytest.approx(30 / 1000)
    balances = {r["customer_id"]: r["balance"] for r in result.state.customers.to_pylist()}
    assert balances == {"c1": 950.0, "c2": 160.0}
    # The bank's statuses, as of each event; unknown where no account is known.
    assert [f[t]["card_blocked"] for t in "abcde"] == [0.0, 0.0, 1.0, None, 0.0]
    assert [f[t]["account_not_open"] for t in "abcde"] == [0.0, 0.0, 0.0, None, 1.0]


@pytest.mark.parametrize("split", [1, 2, 3, 4])
def test_ledger_anchoring_is_the_same_in_any_batches(split: int) -> None:
    """Batches split anywhere, or other customers in the batch, change no number."""
    state = stored_customer("c1", 500.0, 600).updated(stored_customer("c2", 200.0, 2100))
    whole = compute_features(with_ledger(LEDGER_ROWS, LEDGER), state)
    rows = sorted(LEDGER_ROWS[:4], key=lambda r: r["event_time"])
    first = compute_features(with_ledger(rows[:split], LEDGER), state)
    second = compute_features(with_ledger(rows[split:], LEDGER), state.updated(first.state))
    parts = by_id(first.features) | by_id(second.features)
    expected = by_id(whole.features)
    for tid, row in parts.items():
        assert row == expected[tid], tid
    final = state.updated(first.state).updated(second.state).customers
    c1 = {r["customer_id"]: r["balance"] for r in final.to_pylist()}["c1"]
    assert c1 == 950.0


def test_without_accounts_the_balance_is_the_running_sum() -> None:
    """No account columns, or all null: exactly the stream's own running balance."""
    state = stored_customer("c1", 500.0, 600)
    plain = compute_features(table(LEDGER_ROWS[:4]), state)
    nulls = compute_features(with_ledger(LEDGER_ROWS[:4], {}), state)
    assert plain.features.equals(nulls.features.cast(plain.features.schema))
    assert [r["balance_before"] for r in plain.features.to_pylist()] == [500.0, 400.0, 450.0, 420.0]


def test_a_terminal_keeps_one_count_per_day_whatever_its_traffic() -> None:
    """Bounded state: 2,400 events over 48 days at one terminal leave at most 45 day counts,
    and the counts give the same windows as the events themselves (split or whole)."""
    rows = [tx(f"b{i}", i * 29, customer=f"c{i % 50}", terminal="busy") for i in range(2_400)]
    whole = compute_features(table(rows), FeatureState.empty())
    (state,) = whole.state.terminals.to_pylist()
    assert len(state["days"]) == len(state["day_counts"]) == TERMINAL_DAYS + 1 == 45
    assert state["days"] == sorted(state["days"]) and state["n_transactions"] == 2_400
    last_day = (T0 + timedelta(minutes=2399 * 29)).timestamp() // 86_400
    assert state["days"][-1] == last_day and state["days"][0] == last_day - TERMINAL_DAYS
    per_day: dict[int, int] = {}
    for r in rows:
        day = int(r["event_time"].timestamp() // 86_400)
        per_day[day] = per_day.get(day, 0) + 1
    assert state["day_counts"] == [per_day[d] for d in state["days"]]
    # The same features when the stream comes in pieces (the state carries the day counts).
    current, parts = FeatureState.empty(), []
    for i in range(0, len(rows), 300):
        r = compute_features(table(rows[i : i + 300]), current)
        parts.append(r.features)
        current = current.updated(r.state)
    assert pa.concat_tables(parts).equals(whole.features)
    f = by_id(whole.features)
    # The last event's 1-day window: its day so far and the whole day before.
    t_last = rows[-1]["event_time"]
    day_start = T0 + timedelta(days=int((t_last - T0).total_seconds() // 86_400))
    expected = sum(1 for r in rows[:-1] if r["event_time"] >= day_start - timedelta(days=1))
    assert f["b2399"]["terminal_tx_count_1d"] == expected


def test_weekend_and_night_by_hand() -> None:
    # T0 is Thursday 2026-01-01 00:00 UTC.
    rows = [tx("thu_night", 5 * 60 + 59), tx("thu_day", 6 * 60), tx("sat", 2 * 1440 + 600)]
    rows += [tx("sun_night", 3 * 1440 + 30), tx("mon", 4 * 1440 + 30)]
    f = by_id(compute_features(table(rows), FeatureState.empty()).features)
    assert [f[t]["is_weekend"] for t in ("thu_night", "thu_day", "sat", "sun_night", "mon")] == [
        0.0, 0.0, 1.0, 1.0, 0.0,
    ]  # fmt: skip
    assert [f[t]["is_night"] for t in ("thu_night", "thu_day", "sat", "sun_night", "mon")] == [
        1.0, 0.0, 0.0, 1.0, 1.0,
    ]  # fmt: skip


DAY = 1440  # minutes


@pytest.mark.parametrize("delay", [0, 3, 7])
def test_delayed_terminal_risk_by_hand(delay: int) -> None:
    """Days [d - delay - w, d - delay - 1] of the terminal, frauds among them reported by t."""
    # One transaction per day at the terminal, days 0..39 at noon; frauds on days 20, 28, 31, 35.
    rows = [tx(f"k{d}", d * DAY + 720, customer=f"c{d}", terminal="k") for d in range(40)]
    fraud_days = {20: 1.0, 28: 2.5, 31: 0.5, 35: 4.5}  # day -> reporting delay in days
    frauds = pa.Table.from_pylist(
        [
            {
                "terminal_id": "k",
                "event_time": T0 + timedelta(minutes=d * DAY + 720),
                "reported_at": T0 + timedelta(minutes=d * DAY + 720 + late * DAY),
            }
            for d, late in fraud_days.items()
        ],
        schema=KNOWN_FRAUD_SCHEMA,
    )
    result = compute_features(table(rows), FeatureState.empty(), frauds, label_delay_days=delay)
    f = by_id(result.features)
    day = 38  # the event at noon of day 38
    for w, days in {"1d": 1, "7d": 7, "30d": 30}.items():
        first, last = day - delay - days, day - delay - 1  # both included
        in_window = [d for d in range(first, last + 1) if d >= 0]
        known = [
            d for d in in_window if d in fraud_days and d + fraud_days[d] <= day
        ]  # reported by the event's time (noon of day 38)
        count = f[f"k{day}"][f"terminal_tx_count_{w}_delayed"]
        assert count == len(in_window), (w, delay)
        risk = f[f"k{day}"][f"terminal_risk_{w}_delayed"]
        assert risk == pytest.approx(len(known) / len(in_window)), (w, delay)
    # The edge: a fraud on the window's last day counts, one on the next day (inside the delay)
    # does not; with delay 0 the event's own day is outside every delayed window.
    edge = by_id(result.features)[f"k{29 + delay}"]
    reported, event = 28.5 + 2.5, 29.5 + delay  # in days since T0
    assert edge["terminal_risk_1d_delayed"] == (1.0 if reported <= event else 0.0)
    # The same numbers when the days come in pieces (the terminal state carries them).
    state, parts = FeatureState.empty(), []
    for i in range(0, len(rows), 9):
        r = compute_features(table(rows[i : i + 9]), state, frauds, label_delay_days=delay)
        parts.append(r.features)
        state = state.updated(r.state)
    assert pa.concat_tables(parts).equals(result.features)
    with pytest.raises(ValueError, match="label_delay_days"):
        compute_features(table(rows), FeatureState.empty(), frauds, label_delay_days=15)


def test_a_busy_customer_keeps_a_day_of_debits_and_day_sums() -> None:
    """Bounded customer state: one day of debits and at most 31 day sums, whatever the traffic;
    the 7/30-day calendar windows equal counting the debits themselves; exact 1h/1d windows."""
    rows = [
        tx(f"e{i}", i * 17, amount=round(1.37 * (i % 11) + 0.01, 2), kind="credit" if i % 7 == 0
           else "debit", terminal=f"k{i % 5}")
        for i in range(3_500)
    ]  # fmt: skip
    whole = compute_features(table(rows), FeatureState.empty())
    (state,) = whole.state.customers.to_pylist()
    last = rows[-1]["event_time"]
    debits = [r for r in rows if r["kind"] == "debit"]
    assert state["history_times"] == [
        r["event_time"] for r in debits if r["event_time"] > last - timedelta(days=1)
    ]
    assert len(state["days"]) == 31 and state["days"][-1] == int(last.timestamp() // 86_400)
    assert state["day_counts"] == [
        sum(1 for r in debits if int(r["event_time"].timestamp() // 86_400) == d)
        for d in state["days"]
    ]
    assert state["day_cents"] == [
        sum(round(r["amount"] * 100) for r in debits if r["event_time"].timestamp() // 86_400 == d)
        for d in state["days"]
    ]
    f = by_id(whole.features)
    for r in rows[-200::37]:
        t = r["event_time"]
        earlier = [d for d in debits if d["event_time"] < t]
        day_start = datetime(t.year, t.month, t.day, tzinfo=UTC)
        for w, window_start in {
            "1h": t - timedelta(hours=1),
            "1d": t - timedelta(days=1),
            "7d": day_start - timedelta(days=7),
            "30d": day_start - timedelta(days=30),
        }.items():
            inside = [d["amount"] for d in earlier if d["event_time"] > window_start - EPS]
            if w in ("1h", "1d"):
                inside = [d["amount"] for d in earlier if d["event_time"] > window_start]
            got = f[r["transaction_id"]]
            assert got[f"count_{w}"] == len(inside), w
            assert got[f"mean_amount_{w}"] == pytest.approx(sum(inside) / len(inside)), w
        assert got["velocity_1d_to_30d"] == pytest.approx(got["count_1d"] / (got["count_30d"] / 30))
        assert got["amount_to_mean_7d"] == pytest.approx(r["amount"] / got["mean_amount_7d"])
    # Cut anywhere, the window numbers are the same bit for bit (sums are kept in cents; the
    # running balance is a float sum, whose last bits depend on where it was stored).
    current, parts = FeatureState.empty(), []
    for i in range(0, len(rows), 413):
        step = compute_features(table(rows[i : i + 413]), current)
        parts.append(step.features)
        current = current.updated(step.state)
    balance = ["balance_before", "amount_balance_ratio"]
    assert (
        pa.concat_tables(parts).drop_columns(balance).equals(whole.features.drop_columns(balance))
    )


EPS = timedelta(microseconds=1)


def test_a_customer_state_from_before_the_day_sums_scores_the_same() -> None:
    """A customer_state row of feature version 3 (30 days of debits, no day columns) is read as
    its debits one by one: the next batch's features equal those from a version 4 state.

    (Version 3 kept the debits after last - 30 days; the oldest of the 31 calendar days may
    then miss its first hours, so the first 30-day windows after the upgrade can count fewer.)"""
    rows = [tx(f"e{i}", i * 97, amount=3.0 + i % 13, terminal=f"k{i % 3}") for i in range(600)]
    head, tail = table(rows[:500]), table(rows[500:])
    new_state = compute_features(head, FeatureState.empty()).state
    (row,) = new_state.customers.to_pylist()
    last = row["last_event_time"]
    since = datetime(last.year, last.month, last.day, tzinfo=UTC) - timedelta(days=30)
    old = {
        **{k: row[k] for k in ("customer_id", "balance", "last_event_time", "n_transactions")},
        "locations": row["locations"],
        "history_times": [r["event_time"] for r in rows[:500] if r["event_time"] >= since],
        "history_amounts": [r["amount"] for r in rows[:500] if r["event_time"] >= since],
    }
    legacy = FeatureState(
        pa.Table.from_pylist([old], schema=CUSTOMER_STATE_SCHEMA), new_state.terminals
    )
    want = compute_features(tail, new_state)
    got = compute_features(tail, legacy)
    assert got.features.equals(want.features)
    assert got.state.customers.equals(want.state.customers)


@pytest.mark.parametrize("delay", [0, 3, 7])
def test_known_fraud_counts_equal_a_pairwise_count(delay: int) -> None:
    """Each event's known-fraud counts, batch by batch, equal counting every (event, fraud) pair.

    Frauds reported before a batch are counted by binary search, those reported during it pair
    by pair; both paths, the window edges (frauds at midnight, reports at the event's very time)
    and bad labels (reported before their event) must agree with the definition."""
    import random

    rng = random.Random(delay)
    start = T0 + timedelta(days=40)
    rows = [
        tx(f"e{i}", rng.uniform(0, 20 * DAY), customer=f"c{i % 7}", terminal=f"t{rng.randrange(4)}")
        for i in range(600)
    ]
    rows = [{**r, "event_time": r["event_time"] + timedelta(days=40)} for r in rows]
    rows.sort(key=lambda r: r["event_time"])
    frauds = []
    for _ in range(300):
        happened = start + timedelta(
            minutes=rng.choice([rng.uniform(-45, 20), rng.randint(-45, 20)]) * DAY
        )
        late = rng.choice([rng.uniform(0, 12) * DAY, 0.0, rng.uniform(-1, 0) * DAY])
        frauds.append(
            {
                "terminal_id": f"t{rng.randrange(5)}",  # t4: a terminal no event uses
                "event_time": happened,
                "reported_at": happened + timedelta(minutes=late),
            }
        )
    # Some reports at exactly an event's time: "reported by the event's time" includes it.
    for r in rows[::37]:
        frauds.append(
            {"terminal_id": r["terminal_id"], "event_time": r["event_time"] - timedelta(days=2),
             "reported_at": r["event_time"]}
        )  # fmt: skip
    known = pa.Table.from_pylist(frauds, schema=KNOWN_FRAUD_SCHEMA)

    def expected(event: dict, window: str) -> int:
        day = (event["event_time"] - T0).days
        days = {"1d": 1, "7d": 7, "30d": 30}[window.removesuffix("_delayed")]
        first, last = (day - days, day) if window in ("1d", "7d", "30d") else (
            day - days - delay, day - delay - 1)  # fmt: skip
        return sum(
            1
            for f in frauds
            if f["terminal_id"] == event["terminal_id"]
            and f["event_time"] <= event["event_time"]
            and f["reported_at"] <= event["event_time"]
            and first <= (f["event_time"] - T0).days <= last
        )

    state, between = FeatureState.empty(), 0  # rates strictly between 0 and 1: not clipped
    for i in range(0, len(rows), 60):
        batch = rows[i : i + 60]
        result = compute_features(table(batch), state, known, label_delay_days=delay)
        state = state.updated(result.state)
        got = by_id(result.features)
        for event in batch:
            f = got[event["transaction_id"]]
            for w in ("1d", "7d", "30d"):
                for window, count, rate in (
                    (w, f"terminal_tx_count_{w}", f"terminal_fraud_rate_{w}"),
                    (
                        f"{w}_delayed",
                        f"terminal_tx_count_{w}_delayed",
                        f"terminal_risk_{w}_delayed",
                    ),
                ):
                    want = min(expected(event, window) / f[count], 1.0) if f[count] else None
                    between += want is not None and 0 < want < 1
                    assert f[rate] == (pytest.approx(want) if want is not None else None), (
                        event["transaction_id"], window)  # fmt: skip
    assert between > 1000


@pytest.mark.parametrize("step", [1, 2**58])  # times that pack into one int64 key, and not
def test_processing_order_is_key_time_history_then_arrival(step: int) -> None:
    """The packed stable argsort (and its fallback) orders a timeline as the 4-key lexsort that
    defines it, ties included: key, time, history before batch, then arrival order."""
    import numpy as np

    from models.features import _processing_order

    rng = np.random.default_rng(step)
    n, n_hist = 2000, 1200
    codes = rng.integers(0, 40, n)
    times = rng.integers(-5, 6, n) * step  # many equal times, within and across both parts
    is_batch = np.arange(n) >= n_hist
    want = np.lexsort((np.arange(n), is_batch, times, codes))
    assert np.array_equal(_processing_order(codes, times, n_hist), want)


def test_window_prefix_of_whole_numbers_is_the_per_key_float_sum() -> None:
    """Counts and cents are summed by one int64 cumsum: every within-key difference equals the
    per-key float sum bit for bit; other values keep the per-key float sums."""
    import numpy as np

    from models.features import _prefix_sums, _window_prefix

    rng = np.random.default_rng(0)
    codes = np.sort(rng.integers(0, 50, 3000))
    values = rng.integers(0, 10**6, 3000).astype(np.float64)
    first = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    key_start = first[np.searchsorted(first, np.arange(3000), side="right") - 1]
    whole = _window_prefix(codes, values)
    assert whole.dtype == np.int64
    per_key = _prefix_sums(codes, values)[:-1]
    assert np.array_equal((whole[:-1] - whole[key_start]).astype(np.float64), per_key)
    for other in (values + 0.25, values - 10**5, np.where(values > 5 * 10**5, np.nan, values)):
        assert np.array_equal(
            _window_prefix(codes, other), _prefix_sums(codes, other), equal_nan=True
        )
