"""The code location: merges each area's small definitions with the deployment's resources.

Loaded lazily (`dagster.definitions`): the deployment (`STREAMGUARD_DEPLOYMENT`, default
`local`) and the variables its resources name are read when Dagster loads the code location,
never when this module is imported.
"""

import os

import dagster as dg

from assets import (
    backtest,
    cdc,
    checks,
    continuous,
    maintenance,
    model,
    monitoring,
    scoring,
    sensors,
    weather,
)
from assets.resources import deployment_resources

AREAS = (
    model.defs,
    scoring.defs,
    checks.defs,
    sensors.defs,
    weather.defs,
    monitoring.defs,
    maintenance.defs,
    backtest.defs,
    cdc.defs,
    continuous.defs,
)


@dg.definitions
def defs() -> dg.Definitions:
    deployment = os.environ.get("STREAMGUARD_DEPLOYMENT", "local")
    resources = deployment_resources(deployment)  # type: ignore[arg-type]  # validated there
    return dg.Definitions.merge(dg.Definitions(resources=resources), *AREAS)
