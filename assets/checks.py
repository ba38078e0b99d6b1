"""Data quality checks on the scoring job's tables, and the fraud model's promotion gate."""

import dagster as dg
import pyarrow.compute as pc

from assets.model import evaluation_metadata
from assets.resources import HomeResource, MlflowResource
from models.job import SCORES, TRANSACTIONS
from models.promotion import decide_promotion
from models.registry import CHALLENGER, CHAMPION, alias_version
from streamguard.commit import DEAD_LETTER_TABLE

SCORES_UNIQUE_TRANSACTION = "scores_unique_transaction_id"
SCORES_IN_UNIT_INTERVAL = "scores_within_unit_interval"
DEAD_LETTER_RATE = "dead_letter_rate_below_threshold"
DEAD_LETTER_RATE_THRESHOLD = 0.01
CHALLENGER_BEATS_CHAMPION = "challenger_beats_champion"
FRAUD_MODEL = "fraud_model"


@dg.asset_check(asset=SCORES, name=SCORES_UNIQUE_TRANSACTION, blocking=True)
def scores_unique_transaction_id(home: HomeResource) -> dg.AssetCheckResult:
    """Exactly once: no transaction is scored twice."""
    ids = home.lake().read(SCORES, columns=["transaction_id"])["transaction_id"]
    duplicates = len(ids) - len(pc.unique(ids))
    return dg.AssetCheckResult(
        passed=duplicates == 0,
        metadata={"rows": len(ids), "duplicate_rows": duplicates},
    )


@dg.asset_check(asset=SCORES, name=SCORES_IN_UNIT_INTERVAL, blocking=True)
def scores_within_unit_interval(home: HomeResource) -> dg.AssetCheckResult:
    """Scores are probabilities: null or outside [0, 1] means a broken model or join."""
    scores = home.lake().read(SCORES, columns=["score"])["score"]
    bad = int(
        pc.sum(
            pc.or_(pc.is_null(scores), pc.or_(pc.less(scores, 0), pc.greater(scores, 1)))
        ).as_py()
        or 0
    )
    return dg.AssetCheckResult(passed=bad == 0, metadata={"rows": len(scores), "out_of_range": bad})


@dg.asset_check(asset=DEAD_LETTER_TABLE, name=DEAD_LETTER_RATE)
def dead_letter_rate(home: HomeResource) -> dg.AssetCheckResult:
    """A rising share of rejected records means a producer broke the contract."""
    lake = home.lake()
    dead, good = lake.count(DEAD_LETTER_TABLE), lake.count(TRANSACTIONS)
    rate = dead / (dead + good) if dead + good else 0.0
    reasons = lake.read(DEAD_LETTER_TABLE, columns=["reason"])["reason"]
    top = pc.value_counts(reasons).to_pylist()[:5] if len(reasons) else []
    return dg.AssetCheckResult(
        passed=rate <= DEAD_LETTER_RATE_THRESHOLD,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "dead_letters": dead,
            "transactions": good,
            "rate": rate,
            "threshold": DEAD_LETTER_RATE_THRESHOLD,
            "top_reasons": dg.MetadataValue.json(
                [{"reason": r["values"], "count": r["counts"]} for r in top]
            ),
        },
    )


@dg.asset_check(asset=FRAUD_MODEL, name=CHALLENGER_BEATS_CHAMPION, blocking=True)
def challenger_beats_champion(home: HomeResource, mlflow: MlflowResource) -> dg.AssetCheckResult:
    """The promotion gate: the challenger must be strictly better than the champion.

    The decision is `decide_promotion`'s: both compared on the challenger's stored time-based
    holdout by the metric it was trained for, reusing the evaluation recorded at training when
    it was against the current champion, else evaluating again (and recording it). Blocking, so
    a failure stops `fraud_model_champion` from moving the alias.
    """
    uri, name = mlflow.uri(home.home()), mlflow.model_name
    challenger = alias_version(uri, name, CHALLENGER)
    if challenger is None:
        champion = alias_version(uri, name, CHAMPION)
        return dg.AssetCheckResult(
            passed=True,
            metadata={"champion_version": champion or "-", "reason": "no challenger to promote"},
        )
    decision = decide_promotion(uri, name, challenger)
    return dg.AssetCheckResult(
        passed=decision.approved, metadata=evaluation_metadata(decision.evaluation)
    )


defs = dg.Definitions(
    asset_checks=[
        scores_unique_transaction_id,
        scores_within_unit_interval,
        dead_letter_rate,
        challenger_beats_champion,
    ]
)
