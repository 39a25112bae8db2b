"""Settings every test needs, set once before any test module imports transformers, Prefect or MLflow.

Nothing is fetched from a hub (a failed lookup would retry for ~48 s), no telemetry is sent, and
Prefect stays quiet (no log line after pytest closes stderr) and patient on a busy machine.
"""
import os

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(key, value)
