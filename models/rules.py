"""Rules fraud analysts can read, and how they combine with the model score into an alert.

The model ranks; the rules name patterns an analyst recognises at a glance. A soft rule alone
never raises an alert (each one also fires on plenty of legitimate activity); it lowers the score
needed to alert, so a moderately suspicious transaction that matches a known pattern is still
looked at. A hard rule alerts whatever the score: it states a fact the bank already knows (the
card was blocked, the account frozen or closed), so any spending on it needs a look.
Everything here is vectorised: it runs on every micro-batch of up to ~100k rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from models.schema import float64_values

SOFT_RULES: tuple[str, ...] = (
    "low_balance_large_withdrawal",
    "never_seen_location",
    "velocity_burst",
)
HARD_RULES: tuple[str, ...] = ("blocked_card", "account_not_open")
RULES: tuple[str, ...] = SOFT_RULES + HARD_RULES


@dataclass(frozen=True)
class AlertPolicy:
    """Thresholds of the alert decision and of the rules (one place to tune them)."""

    threshold: float = 0.5  # the model alone alerts at or above this score
    rule_threshold: float = 0.2  # with any rule hit, this score is enough
    low_balance: float = 300.0  # balance before the debit below this is "low"
    large_ratio: float = 0.8  # amount / balance at or above this is "large"
    min_large_amount: float = 100.0  # ...and only for amounts of at least this
    velocity_1h: int = 5  # this many earlier transactions in the last hour is a burst
    min_locations_for_new: int = 3  # a new place only counts for customers seen in >= this many

    def __post_init__(self) -> None:
        if not 0.0 <= self.rule_threshold <= self.threshold <= 1.0:
            raise ValueError(
                "need 0 <= rule_threshold <= threshold <= 1, got "
                f"rule_threshold={self.rule_threshold}, threshold={self.threshold}"
            )


# The feature columns the rules read: all a caller holding an Arrow table has to convert.
RULE_COLUMNS: tuple[str, ...] = (
    "amount",
    "amount_balance_ratio",
    "is_debit",
    "balance_before",
    "location_seen_before",
    "n_locations_seen",
    "count_1h",
    "card_blocked",
    "channel_wire",
    "account_not_open",
)


def _col(features: pd.DataFrame | pa.Table, name: str) -> np.ndarray:
    """One column as float64; from Arrow a null is NaN, as `to_pandas` makes it."""
    if isinstance(features, pa.Table):
        return float64_values(features[name])
    return np.asarray(features[name], dtype=np.float64)


def rule_matrix(features: pd.DataFrame | pa.Table, policy: AlertPolicy) -> np.ndarray:
    """One bool column per rule in `RULES` (a (rows, rules) array), row for row with `features`.

    `features` is a pandas DataFrame or an Arrow table; only `RULE_COLUMNS` are read, so a job
    holding the batch as Arrow converts those ten columns, not the table. An unknown (NaN or
    null) input never fires a rule: comparisons with NaN are false, so a first-seen customer or
    a transaction without a location is not flagged for what we do not know.
    """
    with np.errstate(invalid="ignore"):
        amount = _col(features, "amount")
        ratio = _col(features, "amount_balance_ratio")
        # Money going out: a card payment on a blocked card, any debit of a frozen or closed
        # account (credits still arrive, and a wire transfer needs no card).
        debit = _col(features, "is_debit") == 1.0
        low_balance_large_withdrawal = (
            debit
            & (_col(features, "balance_before") < policy.low_balance)
            & (ratio >= policy.large_ratio)
            & (amount >= policy.min_large_amount)
        )
        never_seen_location = (_col(features, "location_seen_before") == 0.0) & (
            _col(features, "n_locations_seen") >= policy.min_locations_for_new
        )
        velocity_burst = _col(features, "count_1h") >= policy.velocity_1h
        blocked_card = (
            (_col(features, "card_blocked") == 1.0)
            & debit
            & (_col(features, "channel_wire") != 1.0)
        )
        account_not_open = (_col(features, "account_not_open") == 1.0) & debit
    fired = {
        "low_balance_large_withdrawal": low_balance_large_withdrawal,
        "never_seen_location": never_seen_location,
        "velocity_burst": velocity_burst,
        "blocked_card": blocked_card,
        "account_not_open": account_not_open,
    }
    out = np.empty((len(amount), len(RULES)), dtype=bool)
    for j, rule in enumerate(RULES):
        out[:, j] = fired[rule]
    return out


def rule_hits(features: pd.DataFrame | pa.Table, policy: AlertPolicy) -> pd.DataFrame:
    """`rule_matrix` as a DataFrame with one column per rule, on `features`' index (a
    DataFrame's; an Arrow table's rows are numbered from 0)."""
    index = features.index if isinstance(features, pd.DataFrame) else None
    return pd.DataFrame(rule_matrix(features, policy), index=index, columns=list(RULES))


def decide(
    scores: np.ndarray, hits: pd.DataFrame | np.ndarray, policy: AlertPolicy
) -> tuple[np.ndarray, list[str]]:
    """Alert flags and a readable reason per row ("" when no alert).

    alert = score >= threshold, or (any rule hit and score >= rule_threshold), or any hard rule
    hit (whatever the score, NaN included). Otherwise a NaN score never alerts. The reason names
    the score and every rule that fired, e.g. "model 0.93; rules: never_seen_location". `hits`
    is `rule_hits`' DataFrame or `rule_matrix`' array (columns in `RULES` order).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(hits):
        raise ValueError(f"{len(scores)} scores for {len(hits)} rows of rule hits")
    if isinstance(hits, pd.DataFrame):
        hits = hits[list(RULES)]
    fired = np.asarray(hits, dtype=bool).reshape(len(hits), len(RULES))
    hard = fired[:, [RULES.index(r) for r in HARD_RULES]].any(axis=1)
    with np.errstate(invalid="ignore"):
        alert = (
            (scores >= policy.threshold)
            | (fired.any(axis=1) & (scores >= policy.rule_threshold))
            | hard
        )
    reasons = [""] * len(scores)
    rows = np.flatnonzero(alert)
    if len(rows) == 0:
        return alert, reasons
    # Only alerted rows get a string; the rule part is built once per distinct combination.
    codes = fired[rows] @ (1 << np.arange(len(RULES)))
    suffix = {
        int(code): "; rules: " + ", ".join(r for j, r in enumerate(RULES) if code >> j & 1)
        if code
        else ""
        for code in np.unique(codes)
    }
    for row, code, score in zip(rows.tolist(), codes.tolist(), scores[rows].tolist(), strict=True):
        reasons[row] = f"model {'?' if math.isnan(score) else f'{score:.2f}'}{suffix[code]}"
    return alert, reasons
