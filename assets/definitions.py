"""The code location: merges each area's small definitions. Nothing else lives here."""

import dagster as dg

from assets import (
    backtest,
    checks,
    maintenance,
    model,
    monitoring,
    resources,
    scoring,
    sensors,
    weather,
)

AREAS = (
    model.defs,
    scoring.defs,
    checks.defs,
    sensors.defs,
    weather.defs,
    monitoring.defs,
    maintenance.defs,
    backtest.defs,
)

defs = dg.Definitions.merge(resources.defs, *AREAS)
