"""MLflow behind the core's :class:`dograph_core.tracking.Tracker` protocol.

* Where: ``tracking.uri`` in params, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
  working directory (artifacts in ``mlruns/`` beside the database file).
* What: one parent run per pipeline run, one nested run per method x scale x seed (:meth:`child`).
  A training that is resumed reopens its run (``run_id=``; the id is kept in the unit's directory,
  :func:`save_run_ref`), so one run holds the whole curve. Every run carries the reserved source tags
  (``mlflow.source.*``, ``mlflow.source.git.commit``), and the experiment is tagged as a model-training
  one (``mlflow.experimentKind``) so the MLflow 3 UI opens it on its runs table, not the GenAI overview.
* Never in the way: every call is guarded. If the store or server fails (down, locked, refused),
  the failure is reported once as a warning naming the URI and the error, later calls are dropped
  and counted, and training goes on. :attr:`MLflowTracker.error` keeps the first failure so the
  pipeline can print it again at the end.
* No secrets: the values of keys that look like secrets (``hf_token``, ``api_key``; not ``tokenizer`` or
  ``min_tokens``), ``user:password@`` in URLs and secret query parameters (``?token=``, ``sig=``,
  ``X-Amz-Signature=``) are redacted, also inside lists.

Uses :class:`mlflow.tracking.MlflowClient` with explicit run ids (no global "active run"), so
trackers of parallel training runs in threads do not interfere.
"""
from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional

from dograph_core.io import read_json, write_json

log = logging.getLogger("dograph.tracking")

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3.x: the UI shows such experiments as training runs
RUN_REF = "mlflow_run.json"  # in a unit's directory: which MLflow run holds its metrics
_FLUENT = threading.Lock()  # the fluent API (mlflow.transformers.log_model) uses process-wide state
# a secret-looking word as a whole part of a key: `hf_token`, `db.password`, `apiKey`; not `tokenizer`, `min_tokens`
_SECRET_WORD = r"(?:password|passwd|secrets?|token|api[_-]?key|access[_-]?key|private[_-]?key|credentials?|auth)"
_SECRET_KEY = re.compile(rf"(?:^|[_.\-]){_SECRET_WORD}$|(?:^|[_.\-]){_SECRET_WORD}[_.\-]", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<info>[^/@\s]+)@", re.I)
# a query parameter that carries a credential: token=, access_token=, sig=, key=, X-Amz-Signature=, X-Amz-Credential=
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;](?:[\w.-]*[_.-])?(?:token|sig|signature|key|secret|password|passwd|credential|auth))=[^&#\s]*",
    re.I)
_BAD_KEY_CHARS = re.compile(r"[^\w\-./ :]")


class TrackingWarning(UserWarning):
    """MLflow could not be reached or refused a call; training went on without it."""


def resolve_uri(uri: Optional[str] = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def redact(value: str) -> str:
    """Remove ``user:password@`` and secret query parameters (``?token=...``) from URLs in ``value``."""
    value = _URL_USERINFO.sub(lambda m: m.group("scheme") + "***@", value)
    return _QUERY_SECRET.sub(lambda m: m.group("name") + "=***", value)


def _redact_value(v: Any) -> Any:
    """``redact`` every string in ``v``, inside lists, tuples and mappings too."""
    if isinstance(v, str):
        return redact(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_redact_value(x) for x in v)
    if isinstance(v, Mapping):
        return {k: "***" if _SECRET_KEY.search(str(k)) else _redact_value(x) for k, x in v.items()}
    return v


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; secrets redacted."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif _SECRET_KEY.search(str(k)):
            out[key] = "***"
        else:
            out[key] = _redact_value(v)
    return out


@lru_cache(maxsize=None)
def git_commit(cwd: str | Path | None = None) -> str:
    """The checked-out commit (once per process and folder: every MLflow run is tagged with it)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _artifact_location(uri: str) -> Optional[str]:
    """For a local SQLite store, keep artifacts beside the database file."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlruns").as_uri()
    return None


class MLflowTracker:
    """A Tracker that writes to one MLflow run; failures warn once and never raise."""

    def __init__(
        self,
        uri: Optional[str] = None,
        experiment: str = "dograph",
        run_name: Optional[str] = None,
        tags: Optional[Mapping[str, str]] = None,
        parent_run_id: Optional[str] = None,
        run_id: Optional[str] = None,
        attach: bool = False,
    ) -> None:
        """A new run, or with ``run_id`` the existing run reopened (RUNNING again, moved under
        ``parent_run_id``); with ``attach`` too, that run is only written to (another process owns it)."""
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.run_id: Optional[str] = None
        self.reopened = False
        self._attach = attach
        self.experiment_id: Optional[str] = None
        self.error: Optional[str] = None
        self.dropped = 0
        self._lock = threading.Lock()
        self._client: Any = None
        if self.error is None:
            if run_id:
                self._guard("reopen the run", self._reopen, run_id, dict(tags or {}))
            else:
                self._guard("start the run", self._start, dict(tags or {}))

    # -- set-up -----------------------------------------------------------------------------------
    def _start(self, tags: dict[str, str]) -> None:
        self._connect()
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                self.experiment_id = self._client.create_experiment(
                    self.experiment, artifact_location=_artifact_location(self.uri),
                    tags={"mlflow.experimentKind": EXPERIMENT_KIND},
                )
            except Exception:  # created meanwhile by a parallel process
                exp = self._client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id
        if exp is not None and "mlflow.experimentKind" not in (exp.tags or {}):  # made by an older dograph
            self._client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
        tags = {**source_tags(), **tags}
        if self.parent_run_id:
            tags = {"mlflow.parentRunId": self.parent_run_id, **tags}
        run = self._client.create_run(self.experiment_id, tags=tags, run_name=self.run_name)
        self.run_id = run.info.run_id

    def _connect(self) -> None:
        if self.uri.startswith(("http://", "https://")):
            # fail within seconds, not minutes, when the server is down
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)

    def _reopen(self, run_id: str, tags: dict[str, str]) -> None:
        self._connect()
        try:
            run = self._client.get_run(run_id)
        except Exception as e:  # noqa: BLE001
            if self._attach or "RESOURCE_DOES_NOT_EXIST" not in str(getattr(e, "error_code", "")):
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":  # deleted in the UI, or a fresh store
            log.info("MLflow run %s of %s is gone; starting a new run", run_id, self.run_name)
            return self._start(tags)
        self.run_id = run_id
        self.experiment_id = run.info.experiment_id
        if self._attach:
            return
        self.reopened = True
        self._client.update_run(run_id, status="RUNNING")
        if self.parent_run_id and run.data.tags.get("mlflow.parentRunId") != self.parent_run_id:
            tags = {"mlflow.parentRunId": self.parent_run_id,  # the comparison of the pipeline run now holds it
                    "dograph.previous_parent_run_id": run.data.tags.get("mlflow.parentRunId", ""), **tags}
        for k, v in tags.items():
            self._client.set_tag(run_id, k, redact(str(v)))

    def _guard(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self.error is not None:
                self.dropped += 1
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - tracking must never stop training
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                msg = (
                    f"MLflow tracking to {redact(self.uri)} failed to {what} ({self.error}); "
                    f"training goes on, later tracking calls of run {self.run_name or self.run_id} are dropped"
                )
                log.warning(msg)
                warnings.warn(msg, TrackingWarning, stacklevel=3)
                return None

    @property
    def ok(self) -> bool:
        return self.error is None and self.run_id is not None

    # -- Tracker protocol -------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(_BAD_KEY_CHARS.sub("_", k)[:250], str(v)[:6000]) for k, v in flatten(params).items()]

        def send() -> None:
            for i in range(0, len(flat), 100):
                self._client.log_batch(self.run_id, params=flat[i : i + 100])

        self._guard("log params", send)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.log_metric_history([(step, metrics)])

    def log_metric_history(self, records: list[tuple[Optional[int], Mapping[str, Any]]]) -> None:
        """Many steps' metrics (``[(step, {name: value})]``) in batches of 1000, not one request per step;
        values that are not finite numbers are left out."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = []
        for step, metrics in records:
            for k, v in metrics.items():
                try:
                    fv = float(v)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(fv):
                    ms.append(Metric(_BAD_KEY_CHARS.sub("_", str(k))[:250], fv, ts, int(step or 0)))

        def send() -> None:
            for i in range(0, len(ms), 1000):
                self._client.log_batch(self.run_id, metrics=ms[i : i + 1000])

        if ms:
            self._guard("log metrics", send)

    def log_corpus(self, tokenized_dir: str | Path, digest: str, context: str = "training") -> None:
        """The tokenized corpus as an MLflow dataset input: one row per domain (tokens, docs, share),
        named ``corpus-<digest>``, with ``digest`` the pipeline's ``data_version``."""

        def send() -> None:
            import mlflow.data
            import pandas as pd
            from mlflow.entities import DatasetInput, InputTag

            meta = read_json(Path(tokenized_dir) / "corpus.json")
            rows = [{"domain": r["domain"], "heldout": bool(r.get("heldout")), "share": float(r.get("share") or 0.0),
                     **{f"tokens_{k}": int(v) for k, v in (r.get("tokens") or {}).items()},
                     **{f"docs_{k}": int(v) for k, v in (r.get("docs") or {}).items()}}
                    for r in meta.get("table", [])]
            with warnings.catch_warnings():  # two advisory warnings that every flow log repeated, and only them
                warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways", category=UserWarning)
                warnings.filterwarnings("ignore", message=".*Inferred schema contains integer", category=UserWarning)
                ds = mlflow.data.from_pandas(pd.DataFrame(rows), source=str(Path(tokenized_dir).resolve()),
                                             name=f"corpus-{digest}", digest=digest)._to_mlflow_entity()
            self._client.log_inputs(self.run_id, datasets=[
                DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])

        self._guard("log the dataset", send)

    def log_model(self, model_dir: str | Path, name: str = "model", registered_model_name: Optional[str] = None,
                  card: Optional[str] = None) -> Optional[str]:
        """A Hugging Face model folder (``final/``) as an ``mlflow.transformers`` model of this run
        (text-generation; a LoggedModel in MLflow 3, loadable with ``mlflow.transformers.load_model``),
        registered under ``registered_model_name`` when given. Returns the model URI.

        ``card`` is the model card's markdown (``model_card.md`` of the logged model). The card is always
        given: without one MLflow looks the local folder up on the Hugging Face Hub as a repository id,
        which fails (offline, or because no such repository exists) and warns at every model logged."""

        def send() -> str:
            import mlflow
            import mlflow.transformers
            import torch
            import transformers
            from huggingface_hub import ModelCard
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(model_dir)
            tok = AutoTokenizer.from_pretrained(model_dir)
            reqs = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
            with _FLUENT, _use_tracking_uri(self.uri):
                mlflow.start_run(run_id=self.run_id)  # the fluent API links the model to the active run
                try:
                    info = mlflow.transformers.log_model(
                        {"model": model, "tokenizer": tok}, name=name, task="text-generation",
                        registered_model_name=registered_model_name, pip_requirements=reqs,
                        model_card=ModelCard(card or f"# {Path(model_dir).name}\n\nA GPT-2 trained by dograph.\n"))
                finally:
                    mlflow.end_run("RUNNING")  # leave the run's status to end()
            return info.model_uri

        return self._guard(f"log the model {model_dir}", send)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if not p.exists():
            log.warning("artifact %s does not exist; not logged", p)
            return
        if p.is_dir():
            self._guard(f"log artifacts {p}", self._client.log_artifacts, self.run_id, str(p), artifact_path)
        else:
            self._guard(f"log artifact {p}", self._client.log_artifact, self.run_id, str(p), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        def send() -> None:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, redact(str(v)))

        self._guard("set tags", send)

    # -- runs -------------------------------------------------------------------------------------
    def child(self, run_name: str, tags: Optional[Mapping[str, str]] = None) -> "MLflowTracker":
        """A nested run under this one."""
        return MLflowTracker(self.uri, self.experiment, run_name=run_name, tags=tags, parent_run_id=self.run_id)

    def spec(self) -> dict[str, Any]:
        """Plain data from which another thread or process attaches nested runs (:func:`tracker_for`)."""
        return {"uri": self.uri, "experiment": self.experiment, "parent_run_id": self.run_id, "enabled": self.ok}

    def run_spec(self) -> dict[str, Any]:
        """Plain data from which another process writes into this very run (:func:`attached_tracker`)."""
        return {"uri": self.uri, "experiment": self.experiment, "run_id": self.run_id, "enabled": self.ok}

    def end(self, status: str = "FINISHED") -> None:
        if self._attach:  # the process that opened the run ends it
            return
        if self.run_id is not None:
            self._guard("end the run", self._client.set_terminated, self.run_id, status)
        if self.dropped:
            log.warning("MLflow: %d tracking calls of run %s were dropped after: %s", self.dropped, self.run_name, self.error)

    def __enter__(self) -> "MLflowTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")

    def ui_path(self) -> str:
        """Where in the MLflow UI these runs are: the experiment's runs table in the UI's "Model training"
        mode (MLflow 3.17's UI opens in its GenAI mode, on the traces overview, unless told otherwise)."""
        return f"/#/experiments/{self.experiment_id or ''}?workflowType=machine_learning"

    def ui_hint(self) -> str:
        """How to see these runs."""
        if self.uri.startswith(("http://", "https://")):
            return f"open {redact(self.uri).rstrip('/')}{self.ui_path()} in a browser"
        return (f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1, "
                f"then open http://127.0.0.1:5000{self.ui_path()}")


def tracker_for(spec: Optional[Mapping[str, Any]], run_name: str, tags: Optional[Mapping[str, str]] = None,
                run_id: Optional[str] = None):
    """A nested MLflow run under ``spec["parent_run_id"]`` (with ``run_id``: that run reopened and moved
    there), or a do-nothing tracker when tracking is off."""
    from dograph_core.tracking import NullTracker

    if not spec or not spec.get("enabled"):
        return NullTracker()
    return MLflowTracker(spec["uri"], spec["experiment"], run_name=run_name, tags=tags,
                         parent_run_id=spec["parent_run_id"], run_id=run_id)


def attached_tracker(spec: Optional[Mapping[str, Any]]):
    """A tracker writing into the existing run ``spec["run_id"]`` (:meth:`MLflowTracker.run_spec`) from
    another process, e.g. rank 0 of a torchrun training; it never ends the run."""
    from dograph_core.tracking import NullTracker

    if not spec or not spec.get("enabled") or not spec.get("run_id"):
        return NullTracker()
    return MLflowTracker(spec["uri"], spec["experiment"], run_id=spec["run_id"], attach=True)


def source_tags(name: str = "dograph") -> dict[str, str]:
    """The reserved tags the MLflow UI shows in its Source and User columns."""
    import getpass

    tags = {"mlflow.source.name": name, "mlflow.source.type": "LOCAL"}
    commit = git_commit(Path(__file__).resolve().parent.parent)
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        pass
    return tags


def save_run_ref(out: str | Path, tracker: Any) -> None:
    """Keep the MLflow run of a unit in its directory (``mlflow_run.json``), so a resume reopens it."""
    if not isinstance(tracker, MLflowTracker) or not tracker.ok:
        return

    write_json(Path(out) / RUN_REF, {"uri": redact(tracker.uri), "experiment": tracker.experiment,
                                     "run_id": tracker.run_id})


def load_run_ref(out: str | Path, spec: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The run id kept in ``out`` when it belongs to the store and experiment of ``spec``."""
    if not spec or not spec.get("enabled"):
        return None
    try:
        ref = read_json(Path(out) / RUN_REF)
    except (OSError, ValueError):
        return None
    if ref.get("uri") == redact(resolve_uri(spec.get("uri"))) and ref.get("experiment") == spec.get("experiment"):
        return ref.get("run_id") or None
    return None
