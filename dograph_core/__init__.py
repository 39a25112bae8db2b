"""dograph's library: domain mixtures, GPT-2 training and evaluation (no Prefect, MLflow or DVC here)."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dograph")
except PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
    __version__ = "0+unknown"
