"""The bank's `accounts` table and its changes over a simulated period, seeded.

The fraud platform sees card transactions; the core-banking database holds what the card network
does not show: the ledger balance (including fees no card transaction carries), whether an
account is frozen or closed, whether its card is blocked. AWS DMS copies that table out as a full
load, then changes. This module simulates that table for the customers of `models.simulate`, so
the two agree: one primary account `A<n>` per customer `C<n>`, whose balance is posted from that
customer's simulated transactions, and whose card is blocked soon after one of its frauds is
reported (and replaced days later).

Everything is pure Arrow: the runtime (`streamguard.dms`) writes it as DMS files, and
`accounts_as_of` is the reference answer of what a correct change apply must produce.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.schema import (
    ACCOUNT_AS_OF_SCHEMA,
    ACCOUNT_CLOSED,
    ACCOUNT_FROZEN,
    ACCOUNT_OPEN,
    ACCOUNT_STATUSES,
    CARD_ACTIVE,
    CARD_BLOCKED,
    TIMESTAMP,
)
from models.schema import (
    CARD_STATUSES as CARD_STATUSES,  # re-exported: the accounts table's vocabulary
)
from models.simulate import Simulation

OPEN, FROZEN, CLOSED = ACCOUNT_OPEN, ACCOUNT_FROZEN, ACCOUNT_CLOSED
STATUSES: Final = ACCOUNT_STATUSES
ACTIVE, BLOCKED = CARD_ACTIVE, CARD_BLOCKED
INSERT, UPDATE, DELETE = "I", "U", "D"
OPS: Final = (INSERT, UPDATE, DELETE)

# The CDC targets `streamguard.cdc` applies the DMS files to (current rows, SCD 2 history).
ACCOUNTS, ACCOUNTS_HISTORY = "accounts", "accounts_history"
VALID_FROM, VALID_TO = "valid_from", "valid_to"
ACCOUNT_KEY: Final = "account_id"
ACCOUNT_SCHEMA = pa.schema(
    [
        pa.field("customer_id", pa.string(), nullable=False),
        pa.field(ACCOUNT_KEY, pa.string(), nullable=False),
        pa.field("balance", pa.float64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("card_status", pa.string()),  # null: an account without a card (savings)
        pa.field("home_region", pa.string()),  # a location cell, as in transactions' `location`
        pa.field("updated_at", TIMESTAMP, nullable=False),  # commit time of the row's last change
    ]
)
# A change as the source database commits it: the operation, then the row after it (a delete
# carries the row as it was).
CHANGE_SCHEMA = pa.schema([pa.field("op", pa.string(), nullable=False), *ACCOUNT_SCHEMA])

_US = 1_000_000
_DAY = 86_400 * _US
_MINUTE = 60 * _US

# Shares of customers each event happens to (at least one customer each, so small simulations
# exercise every kind of change).
_SAVINGS_SHARE = 0.03  # open a savings account during the period
_SAVINGS_CLOSED_SHARE = 0.5  # of those, closed (balance paid out), then purged (deleted)
_FEE_CENTS = (0, 500, 1_000)  # monthly account fee (ledger only: no card transaction shows it)


@dataclass(frozen=True)
class AccountChanges:
    """The accounts table at the start of the period and every change committed after it."""

    full_load: pa.Table  # ACCOUNT_SCHEMA, one row per account, sorted by account_id
    changes: pa.Table  # CHANGE_SCHEMA, in commit order (updated_at, then the order committed)
    snapshot_time: datetime  # when the full load was taken


def _last_of_groups(keys: np.ndarray) -> np.ndarray:
    """Whether each row is the last of its run of equal consecutive keys."""
    last = np.ones(len(keys), dtype=bool)
    last[:-1] = keys[1:] != keys[:-1]
    return last


def _home_regions(tx: pa.Table, cust: np.ndarray, n: int) -> list[str | None]:
    """Each customer's most frequent location (ties: the smallest cell), None if never seen."""
    location = tx["location"].combine_chunks()
    seen = pc.is_valid(location).to_numpy(zero_copy_only=False)
    cells, codes = np.unique(
        location.filter(seen).to_numpy(zero_copy_only=False), return_inverse=True
    )
    counts = np.zeros((n, max(len(cells), 1)), dtype=np.int64)
    np.add.at(counts, (cust[seen], codes), 1)
    best = counts.argmax(axis=1)
    return [str(cells[best[i]]) if counts[i, best[i]] > 0 else None for i in range(n)]


@dataclass
class _Account:
    customer_id: str
    balance: int  # cents
    status: str
    card_status: str | None
    home_region: str | None
    holds: int = 0  # open freezes
    blocks: int = 0  # open card blocks


# Event kinds, in the order ties at the same microsecond are committed.
_OPEN, _POST, _BLOCK, _UNBLOCK, _FREEZE, _UNFREEZE, _CLOSE, _PURGE = range(8)


def simulate_accounts(sim: Simulation, *, seed: int) -> AccountChanges:
    """The accounts of `sim`'s customers: a full load at the start, then every change.

    - Balance: posted once a day per customer after their last transaction of the day (1-120 s
      later), from the simulated stream plus a ledger-only monthly fee.
    - Card and status: blocked and frozen when the simulation blocked them (`Simulation.blocks`:
      a card 5-60 minutes after the first fraud on it is reported, a new card 3-7 days later; a
      few cards reported lost and replaced 2-10 days later; a few accounts frozen for 1-5 days).
    - Savings: a few customers open a savings account
      `S<n>` (no card), about half of which are closed (balance paid out) and deleted 1-3 days
      later (sooner in a short period, so every closure falls inside it).

    Deterministic in `sim` and `seed`; changes after the last transaction are not simulated.
    """
    tx = sim.transactions
    ids = pc.unique(tx["customer_id"]).sort()
    n = len(ids)
    cust = pc.index_in(tx["customer_id"], value_set=ids).to_numpy()
    times = tx["event_time"].cast(pa.int64()).to_numpy()
    sign = np.where(pc.equal(tx["kind"], "credit").to_numpy(zero_copy_only=False), 1, -1)
    cents = np.rint(tx["amount"].to_numpy() * 100).astype(np.int64) * sign
    t0, end = int(times.min()), int(times.max()) + 1
    days = max(1, math.ceil((end - t0) / _DAY))
    rng = np.random.default_rng([seed, 0xACC0])

    # Ledger-only fees: one a month per customer, in the nightly batch (02:00 after t0's day).
    fee = np.array(_FEE_CENTS)[rng.integers(0, len(_FEE_CENTS), n)]
    fee_day = rng.integers(1, 31, n)
    n_fees = np.maximum(0, (days - fee_day + 29) // 30) * (fee > 0)
    fee_cust = np.repeat(np.arange(n), n_fees)
    fee_rank = np.arange(len(fee_cust)) - np.repeat(np.cumsum(n_fees) - n_fees, n_fees)
    fee_time = t0 + (fee_day[fee_cust] + 30 * fee_rank) * _DAY + 2 * 3600 * _US
    ledger_cust = np.concatenate([cust, fee_cust])
    ledger_time = np.concatenate([times, fee_time])
    ledger_cents = np.concatenate([cents, -fee[fee_cust]])
    order = np.lexsort((np.arange(len(ledger_time)), ledger_time, ledger_cust))
    ledger_cust, ledger_time = ledger_cust[order], ledger_time[order]
    running = np.cumsum(ledger_cents[order])
    first = np.searchsorted(ledger_cust, np.arange(n))
    before = np.concatenate([[0], running])[first]  # running total before each customer's rows
    balance = running - before[ledger_cust]

    # Snapshot at t0: what the opening credit (at t0) left.
    at_start = np.zeros(n, dtype=np.int64)
    opening = ledger_time <= t0
    at_start[ledger_cust[opening]] = balance[opening]  # rows are in time order: the last wins
    # Daily postings after each customer's last event of a day (the t0 snapshot excluded).
    later = ledger_time > t0
    day = (ledger_time - t0) // _DAY
    last = _last_of_groups(ledger_cust * (days + 1) + day) & later
    post_cust, post_balance = ledger_cust[last], balance[last]
    post_time = ledger_time[last] + rng.integers(_US, 120 * _US, int(last.sum()))

    postings = zip(post_time.tolist(), post_cust.tolist(), post_balance.tolist(), strict=True)
    # (time, kind, account index, value); savings accounts are indexed n + customer index.
    events: list[tuple[int, int, int, int]] = [(t, _POST, c, b) for t, c, b in postings]

    def some(share: float) -> np.ndarray:
        return np.sort(rng.choice(n, size=min(n, max(1, round(share * n))), replace=False))

    # Cards blocked and accounts frozen when the simulation blocked them (its stream already
    # lacks the customer's declined debits and carries the fraudsters' retries).
    blocks = sim.blocks
    on_off = {"card": (_BLOCK, _UNBLOCK), "account": (_FREEZE, _UNFREEZE)}
    for customer, what, t_on, t_off in zip(
        pc.index_in(blocks["customer_id"], value_set=ids).to_pylist(),
        blocks["blocks"].to_pylist(),
        blocks["start_at"].cast(pa.int64()).to_pylist(),
        blocks["end_at"].cast(pa.int64()).to_pylist(),
        strict=True,
    ):
        on, off = on_off[what]
        events.append((t_on, on, customer, 0))
        events.append((t_off, off, customer, 0))
    # Savings accounts open in the first 40 % of the period; a closed one lives 15-45 % of it
    # and is purged 1-3 days later (at most a tenth of it), so every closure fits the period.
    savers = some(_SAVINGS_SHARE)
    period = end - t0
    opened = t0 + (rng.uniform(0.0, 0.4, len(savers)) * period).astype(np.int64)
    deposit = np.rint(rng.lognormal(math.log(2_000), 0.8, len(savers)) * 100).astype(np.int64)
    closing = rng.random(len(savers)) < _SAVINGS_CLOSED_SHARE
    closing[:1] = True  # at least one, so small simulations delete a row too
    closed = opened + (rng.uniform(0.15, 0.45, len(savers)) * period).astype(np.int64)
    purge_after = np.minimum(rng.uniform(1, 3, len(savers)) * _DAY, 0.1 * period)
    purged = closed + purge_after.astype(np.int64)
    for i, c in enumerate(savers.tolist()):
        events.append((int(opened[i]), _OPEN, n + c, int(deposit[i])))
        if closing[i]:
            events.append((int(closed[i]), _CLOSE, n + c, 0))
            events.append((int(purged[i]), _PURGE, n + c, 0))

    customer_ids = ids.to_pylist()
    regions = _home_regions(tx, cust, n)
    accounts = {
        c: _Account(customer_ids[c], int(at_start[c]), OPEN, ACTIVE, regions[c]) for c in range(n)
    }
    full_load = _rows(
        ((f"A{customer_ids[c][1:]}", accounts[c], t0) for c in range(n)), with_op=None
    )
    events = sorted(e for e in events if e[0] < end)
    rows: list[tuple[str, str, _Account, int]] = []
    for when, kind, index, value in events:
        op = _step(accounts, index, kind, value, customer_ids, regions, n)
        if op is not None:
            name = customer_ids[index % n][1:]
            rows.append((op, f"{'S' if index >= n else 'A'}{name}", _copy(accounts[index]), when))
            if op == DELETE:
                del accounts[index]
    changes = _rows(((a, acc, t) for _, a, acc, t in rows), with_op=[r[0] for r in rows])
    return AccountChanges(
        full_load=full_load.sort_by(ACCOUNT_KEY),
        changes=changes,
        snapshot_time=pa.scalar(t0, pa.int64()).cast(TIMESTAMP).as_py(),
    )


def _copy(account: _Account) -> _Account:
    return _Account(**vars(account))


def _step(
    accounts: dict[int, _Account],
    index: int,
    kind: int,
    value: int,
    customer_ids: list[str],
    regions: list[str | None],
    n: int,
) -> str | None:
    """Apply one event to the account it concerns; the op it commits, None when nothing changed."""
    if kind == _OPEN:
        c = index - n
        accounts[index] = _Account(customer_ids[c], value, OPEN, None, regions[c])
        return INSERT
    account = accounts.get(index)
    if account is None:
        return None
    before = (account.balance, account.status, account.card_status)
    if kind == _POST:
        account.balance = value
    elif kind in (_BLOCK, _UNBLOCK):
        account.blocks += 1 if kind == _BLOCK else -1
        account.card_status = BLOCKED if account.blocks > 0 else ACTIVE
    elif kind in (_FREEZE, _UNFREEZE):
        account.holds += 1 if kind == _FREEZE else -1
        account.status = FROZEN if account.holds > 0 else OPEN
    elif kind == _CLOSE:
        account.balance, account.status = 0, CLOSED
    elif kind == _PURGE:
        return DELETE
    return UPDATE if (account.balance, account.status, account.card_status) != before else None


def _rows(items: Iterator[tuple[str, _Account, int]], with_op: list[str] | None) -> pa.Table:
    """Account rows (and their ops) as an Arrow table."""
    listed = list(items)
    columns = {
        "customer_id": [a.customer_id for _, a, _ in listed],
        ACCOUNT_KEY: [account_id for account_id, _, _ in listed],
        "balance": [a.balance / 100 for _, a, _ in listed],
        "status": [a.status for _, a, _ in listed],
        "card_status": [a.card_status for _, a, _ in listed],
        "home_region": [a.home_region for _, a, _ in listed],
        "updated_at": pa.array([t for _, _, t in listed], pa.int64()).cast(TIMESTAMP),
    }
    if with_op is None:
        return pa.table(columns, schema=ACCOUNT_SCHEMA)
    return pa.table({"op": with_op, **columns}, schema=CHANGE_SCHEMA)


def accounts_as_of(accounts: AccountChanges, moment: datetime | None = None) -> pa.Table:
    """The accounts table as the source database held it at `moment` (default: the end).

    The reference any correct apply of the full load and the changes must reproduce: per
    account, the last change committed at or before `moment` (commit order breaks ties), and no
    row when that change is a delete. Sorted by account_id.
    """
    changes = accounts.changes
    if moment is not None:
        changes = changes.filter(pc.less_equal(changes["updated_at"], pa.scalar(moment, TIMESTAMP)))
    load = accounts.full_load.add_column(
        0, "op", pa.array([INSERT] * accounts.full_load.num_rows, pa.string())
    )
    every = pa.concat_tables([load.cast(CHANGE_SCHEMA), changes])
    every = every.append_column("_order", pa.array(np.arange(every.num_rows), pa.int64()))
    last = every.group_by(ACCOUNT_KEY, use_threads=False).aggregate([("_order", "max")])
    latest = every.take(last["_order_max"])
    latest = latest.filter(pc.not_equal(latest["op"], DELETE))
    return latest.select(ACCOUNT_SCHEMA.names).cast(ACCOUNT_SCHEMA).sort_by(ACCOUNT_KEY)


def account_history(accounts: AccountChanges) -> pa.Table:
    """The accounts table's SCD 2 history: every version with `valid_from` (its commit time) and
    `valid_to` (the next change's, null while current); a delete ends the last version.

    The reference a correct SCD 2 apply of the DMS files must reproduce (several changes of an
    account at one commit time: the last committed counts). Sorted by account_id, valid_from.
    """
    load = accounts.full_load.add_column(
        0, "op", pa.array([INSERT] * accounts.full_load.num_rows, pa.string())
    )
    every = pa.concat_tables([load.cast(CHANGE_SCHEMA), accounts.changes])
    frame = every.to_pandas()
    frame["_order"] = np.arange(len(frame))
    frame = frame.sort_values([ACCOUNT_KEY, "updated_at", "_order"], kind="stable")
    frame = frame.drop_duplicates([ACCOUNT_KEY, "updated_at"], keep="last")
    following = frame.groupby(ACCOUNT_KEY, sort=False)["updated_at"].shift(-1)
    frame[VALID_FROM], frame[VALID_TO] = frame["updated_at"], following
    frame = frame[frame["op"] != DELETE]
    schema = pa.schema(
        [*ACCOUNT_SCHEMA, pa.field(VALID_FROM, TIMESTAMP), pa.field(VALID_TO, TIMESTAMP)]
    )
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


# The history columns the as-of join reads.
HISTORY_SCHEMA = pa.schema(
    [
        *(ACCOUNT_SCHEMA.field(c) for c in ("customer_id", "balance", "status", "card_status")),
        pa.field(VALID_FROM, TIMESTAMP),
        pa.field(VALID_TO, TIMESTAMP),
    ]
)
HISTORY_COLUMNS = HISTORY_SCHEMA.names


def history_filter(transactions: pa.Table) -> pc.Expression:
    """The history rows an as-of lookup of these transactions needs: their customers' versions
    begun by the last event and not ended before the first."""
    times = transactions["event_time"]
    return (
        pc.field("customer_id").isin(pc.unique(transactions["customer_id"]))
        & (pc.field(VALID_FROM) <= pc.max(times))
        & (pc.field(VALID_TO).is_null() | (pc.field(VALID_TO) > pc.min(times)))
    )


def account_as_of(transactions: pa.Table, history: pa.Table) -> pa.Table:
    """Per transaction, its customer's card account as the bank held it at the event time.

    `history` holds SCD 2 versions (`HISTORY_COLUMNS`, any other rows and columns ignored): the
    version valid at t has valid_from <= t < valid_to (valid_to null: still current). Only
    accounts with a card count (a card transaction cannot hit a savings account); a customer
    with several card accounts gets the latest version of any of them. No version (unknown
    customer, before the first change, account deleted): nulls. ACCOUNT_AS_OF_SCHEMA, aligned
    with `transactions`.
    """
    n = transactions.num_rows
    cards = history.filter(pc.is_valid(history["card_status"])) if history.num_rows else history
    if n == 0 or cards.num_rows == 0:
        return ACCOUNT_AS_OF_SCHEMA.empty_table() if n == 0 else _no_accounts(n)
    tx_customers = transactions["customer_id"].to_numpy(zero_copy_only=False)
    versions = cards["customer_id"].to_numpy(zero_copy_only=False)
    codes = pd.factorize(np.concatenate([versions, tx_customers]))[0].astype(np.int64)
    v_codes, t_codes = codes[: len(versions)], codes[len(versions) :]
    v_from = cards[VALID_FROM].cast(pa.int64()).to_numpy()
    t_time = transactions["event_time"].cast(pa.int64()).to_numpy()
    m = len(versions)
    # Versions before transactions at equal times (valid_from <= t), then the last version at or
    # before each transaction of the same customer.
    is_tx = np.concatenate([np.zeros(m, np.int8), np.ones(n, np.int8)])
    order = np.lexsort(
        (
            np.arange(m + n),
            is_tx,
            np.concatenate([v_from, t_time]),
            np.concatenate([v_codes, t_codes]),
        )
    )
    all_codes = np.concatenate([v_codes, t_codes])[order]
    position = np.where(order < m, np.arange(m + n), -1)
    last = np.maximum.accumulate(position)
    found = (last >= 0) & (all_codes[np.maximum(last, 0)] == all_codes)
    version = np.where(found, order[np.maximum(last, 0)], -1)
    per_tx = np.full(n, -1, dtype=np.int64)
    tx_rows = order >= m
    per_tx[order[tx_rows] - m] = version[tx_rows]
    # A version closed before the transaction (the account was deleted) does not count.
    v_to = cards[VALID_TO].cast(pa.int64())
    to = pc.fill_null(v_to, np.iinfo(np.int64).max).to_numpy()
    has = per_tx >= 0
    has[has] = to[per_tx[has]] > t_time[has]
    take = pa.array(np.where(has, per_tx, 0), mask=~has)
    return pa.Table.from_arrays(
        [
            cards["balance"].cast(pa.float64()).take(take),
            cards[VALID_FROM].cast(TIMESTAMP).take(take),
            cards["status"].cast(pa.string()).take(take),
            cards["card_status"].cast(pa.string()).take(take),
        ],
        schema=ACCOUNT_AS_OF_SCHEMA,
    )


def _no_accounts(n: int) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.nulls(n, f.type) for f in ACCOUNT_AS_OF_SCHEMA], schema=ACCOUNT_AS_OF_SCHEMA
    )


def with_accounts(transactions: pa.Table, history: pa.Table | None) -> pa.Table:
    """`transactions` with the ACCOUNT_AS_OF_SCHEMA columns (all null without a history)."""
    n = transactions.num_rows
    as_of = _no_accounts(n) if history is None else account_as_of(transactions, history)
    for field in ACCOUNT_AS_OF_SCHEMA:
        if field.name in transactions.column_names:
            transactions = transactions.drop_columns([field.name])
        transactions = transactions.append_column(field, as_of[field.name])
    return transactions
