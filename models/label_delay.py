"""The label delay D of the delayed terminal windows, estimated from the labels at training time.

`terminal_risk_*_delayed` counts a terminal's frauds in windows that end D days before the event's
day, so that most frauds there have been reported by the time the event is scored. How long
reports take is a property of the bank's data, not of the code: D is the `REPORTING_DELAY_QUANTILE`
quantile of the reporting delays (label reported time - transaction event time) observed at
training, in whole days rounded up, within 0..MAX_LABEL_DELAY_DAYS.

Only frauds at least MAX_LABEL_DELAY_DAYS old at the cut-off count: a newer fraud with a long delay
is not reported yet, so the delays of recent frauds are the short ones (right-censoring) and
would pull the estimate down. Delays longer than that window clamp to MAX_LABEL_DELAY_DAYS anyway.
With fewer than MIN_DELAY_LABELS such frauds (a new deployment), D is LABEL_DELAY_DAYS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.features import LABEL_DELAY_DAYS, MAX_LABEL_DELAY_DAYS
from models.training import _utc, _utc_series  # the lake's times, read as UTC alike

# A high quantile: the delayed window's newest day has had at least D days, and for 90% of frauds
# that is enough to be known; a lower one would leave more of the window's frauds unreported.
REPORTING_DELAY_QUANTILE = 0.9
# Below this many delays the quantile is too noisy to trust (its 90th percentile is the 3rd
# largest of 30); the default D is used instead.
MIN_DELAY_LABELS = 30

_DAY = pd.Timedelta(days=1)


@dataclass(frozen=True)
class LabelDelayEstimate:
    """D and what it was estimated from, to be stored with the model that uses it."""

    days: int  # D: the delayed windows' shift, 0..MAX_LABEL_DELAY_DAYS
    n_delays: int  # the reporting delays it was estimated from
    quantile: float
    quantile_days: float | None  # the delays' quantile in days; None when D is the fallback

    @property
    def fallback(self) -> bool:
        """True when there were too few delays and D is LABEL_DELAY_DAYS."""
        return self.quantile_days is None

    def describe(self) -> str:
        """One line for the registry: where D came from."""
        if self.quantile_days is None:
            return (
                f"default {self.days} days: {self.n_delays} reporting delay(s) < "
                f"{MIN_DELAY_LABELS} to estimate from"
            )
        return (
            f"{self.days} days: the {self.quantile:g} quantile of {self.n_delays} reporting "
            f"delays is {self.quantile_days:.2f} days"
        )


def reporting_delays(
    transactions: pd.DataFrame, labels: pd.DataFrame, cutoff: pd.Timestamp
) -> pd.Series:
    """The reporting delays (Timedelta) of the frauds known at `cutoff` that are old enough.

    `transactions` needs `transaction_id` and `event_time`; `labels` LABEL_SCHEMA columns. A
    fraud counts once, from its first fraud report by the cut-off, if its event was at least
    MAX_LABEL_DELAY_DAYS before the cut-off (see the module docstring); a report before the
    event (bad data) counts as no delay.
    """
    cutoff = _utc(cutoff)
    reported = _utc_series(labels["reported_at"])
    frauds = labels.loc[labels["is_fraud"].astype(bool) & (reported <= cutoff), ["transaction_id"]]
    frauds = frauds.assign(reported_at=reported[frauds.index])
    first = frauds.groupby("transaction_id", sort=False)["reported_at"].min()
    events = transactions[["transaction_id", "event_time"]].drop_duplicates("transaction_id")
    event_time = _utc_series(events["event_time"])
    old = events.assign(event_time=event_time).loc[
        event_time <= cutoff - MAX_LABEL_DELAY_DAYS * _DAY
    ]
    joined = old.join(first, on="transaction_id", how="inner")
    delays = joined["reported_at"] - joined["event_time"]
    delays = delays.where(delays > pd.Timedelta(0), pd.Timedelta(0))
    return delays.reset_index(drop=True).rename("reporting_delay")


def estimate_label_delay(
    delays: pd.Series,
    quantile: float = REPORTING_DELAY_QUANTILE,
    min_delays: int = MIN_DELAY_LABELS,
) -> LabelDelayEstimate:
    """D from observed reporting delays: their `quantile` in days, rounded up, clamped.

    The quantile is an observed delay (numpy's "inverted_cdf": the smallest delay that at least
    `quantile` of the delays do not exceed), so one outlier moves it by one rank at most. Fewer
    than `min_delays` delays: LABEL_DELAY_DAYS.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    days = pd.to_timedelta(delays).dropna() / _DAY
    n = len(days)
    if n < min_delays or n == 0:
        return LabelDelayEstimate(LABEL_DELAY_DAYS, n, quantile, None)
    value = float(np.quantile(days.to_numpy(dtype=np.float64), quantile, method="inverted_cdf"))
    d = min(max(math.ceil(value), 0), MAX_LABEL_DELAY_DAYS)
    return LabelDelayEstimate(d, n, quantile, value)
