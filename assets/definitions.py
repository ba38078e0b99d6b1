"""The code location: merges each area's small definitions with the deployment's resources.

Loaded lazily (`dagster.definitions`): the deployment (`STREAMGUARD_DEPLOYMENT`, default
`local`), the variables its resources name and the stream sensors' settings
(`STREAMGUARD_SENSOR_INTERVAL_S`, `STREAMGUARD_SENSOR_WAIT_S`) are read when Dagster loads the
code location, never when this module is imported.
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
    # The stream sensors as the environment sets them, in place of the defaults in AREAS.
    stream_sensors = sensors.sensor_defs(sensors.SensorSettings.from_env(os.environ))
    areas = [stream_sensors if area is sensors.defs else area for area in AREAS]
    return dg.Definitions.merge(dg.Definitions(resources=resources), *areas)
