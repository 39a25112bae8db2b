"""The pipeline's units of work as plain functions (no Prefect): prepare, tokenize, search, train.

Each unit is keyed by a hash of its resolved inputs (see :mod:`tasks.cache`). A unit whose
outputs exist with the same key is skipped; one that stopped half-way under the same key is
resumed (training resumes from its last checkpoint); one left by another key (the code, data,
params or weights file changed) is cleared and starts again from step 0. The CLI calls these functions directly; the Prefect tasks in
:mod:`tasks.prefect_tasks` wrap them with retries and parallelism.

Run directory layout (``pipeline.out_dir/<run id>/``)::

    search/<method>/            the proxy search of an offline method (weights.json, ...)
    train/<method>__<scale>__s<seed>/   one training run (final/, metrics.jsonl, eval.json, ...);
                                the compute yardstick is train/uniform_2x__<scale>__s<seed>/
    <dir>/unit.json             the key the unit's directory was started under
    <dir>.done.json             done marker of each finished unit (its input key)
    report.md, results.json, plots/    written by the report step
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from dograph_core.config import REORDER, REORDER_OFFSET, ROLES, YARDSTICK, ConfigError, Params
from dograph_core.io import code_fingerprint, read_json, write_json
from dograph_core.partition import open_partition
from tasks.cache import clear_done, file_hash, is_done, mark_done, stable_hash
from tasks.params import method_spec
from tasks.tracking import git_commit, load_run_ref, save_run_ref, tracker_for

OFFLINE_TYPES = frozenset({"doremi", "doge"})  # search at the proxy scale, then train on the found mixture
# Not part of a unit's code version: report.py and study.py read finished runs only; config.py resolves
# the params, and what it resolves (every train setting, the method's spec) is in the unit's key itself.
NOT_IN_KEY = frozenset(f"dograph_core/{name}" for name in ("report.py", "study.py", "config.py"))
_ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


def code_version(*packages: str) -> str:
    """Hash of the core's code under ``packages`` (so a code change re-runs the unit; an edit of a comment
    or a docstring does not, see :func:`code_fingerprint`)."""
    files = sorted(f for pkg in packages for f in (_ROOT / pkg).rglob("*.py") if f.relative_to(_ROOT).as_posix() not in NOT_IN_KEY)
    return stable_hash({str(f.relative_to(_ROOT)): code_fingerprint(f) for f in files})


def _code(data: Mapping[str, Any]) -> str:
    """The core's code version, computed once per pipeline run (``data["code"]``) or now."""
    return str(data.get("code") or code_version("dograph_core"))


def _plugin(mixer_type: str) -> dict[str, str]:
    """A plug-in mixer's source hash for a unit's key (its code is outside ``dograph_core``); nothing for a
    built-in one, so the keys of built-in methods are what they were."""
    from dograph_core.mixers import plugin_source_hash

    h = plugin_source_hash(mixer_type)
    return {"plugin": h} if h else {}


def is_offline(mixer_type: str) -> bool:
    """Offline methods find a mixture on a proxy and hand it to other scales as a weights file."""
    try:
        from dograph_core.mixers import mixer_class

        return bool(getattr(mixer_class(mixer_type), "offline", mixer_type in OFFLINE_TYPES))
    except Exception:  # noqa: BLE001 - an unloadable mixer is reported when it is built
        return mixer_type in OFFLINE_TYPES


# -- data ---------------------------------------------------------------------------------------

def prepare_step(p: Params, progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Run the prepare stage unless its output for these params exists."""
    out = Path(p.prepare.out_dir)
    if p.prepare.source == "local":
        src = p.prepare.local.path
        if not src or not Path(src).exists():
            raise ConfigError(
                f"prepare.local.path = {src!r}: no such file or directory "
                f"(give a directory of <domain>/*.txt or a .jsonl/.parquet file)"
            )
    key = data_keys(p)[0]
    if not force and is_done(out, key):
        return {"out_dir": str(out), "key": key, "cached": True}
    from dograph_core.data.prepare import prepare

    manifest = prepare(p.prepare, progress=progress)
    unfetched = list(manifest.get("unfetched") or [])
    if unfetched:  # an incomplete corpus is never marked done: the next run fetches again
        clear_done(out)
        return {"out_dir": str(out), "key": key, "cached": False, "unfetched": unfetched}
    mark_done(out, key, {"train_domains": manifest.get("train_domains"), "heldout_domains": manifest.get("heldout_domains")})
    return {"out_dir": str(out), "key": key, "cached": False}


def data_keys(p: Params) -> tuple[str, str]:
    """The done-marker keys of the prepare and tokenize outputs for these params."""
    pkey = stable_hash({"prepare": p.prepare.model_dump(), "code": code_version("dograph_core/data")})
    tkey = stable_hash({"tokenize": p.tokenize.model_dump(), "prepared": pkey, "code": code_version("dograph_core/data")})
    return pkey, tkey


def data_up_to_date(p: Params) -> bool:
    pkey, tkey = data_keys(p)
    return is_done(p.prepare.out_dir, pkey) and is_done(p.tokenize.out_dir, tkey)


def tokenize_step(p: Params, prepared: Mapping[str, Any], progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Run the tokenize stage unless its output for these params and this prepared data exists."""
    out = Path(p.tokenize.out_dir)
    key = stable_hash({"tokenize": p.tokenize.model_dump(), "prepared": prepared["key"],
                       "code": code_version("dograph_core/data")})
    if force or not is_done(out, key):
        from dograph_core.data.tokenize import tokenize

        tokenize(prepared["out_dir"], p.tokenize, cache_dir=p.prepare.cache_dir, progress=progress)
        mark_done(out, key)
        cached = False
    else:
        cached = True
    return {"out_dir": str(out), "key": key, "cached": cached, "data_version": data_version(out)}


def require_corpus(p: Params) -> None:
    """With the data stages skipped (``--skip-data``), the tokenized corpus must already be there."""
    if not (Path(p.tokenize.out_dir) / "corpus.json").is_file():
        from dograph_core.data.corpus import CorpusError

        raise CorpusError(f"--skip-data: no tokenized corpus at {p.tokenize.out_dir} (no corpus.json); run without "
                          f"--skip-data once, or `dograph prepare` and `dograph tokenize`, to build it")


def data_version(tokenized_dir: str | Path) -> str:
    """A short hash of the tokenized corpus (tokenizer and per-domain token counts)."""
    meta = read_json(Path(tokenized_dir) / "corpus.json")
    return stable_hash({k: meta.get(k) for k in ("tokenizer_hash", "vocab_size", "table", "train_domains", "heldout_domains")}, 12)


# -- search and training ------------------------------------------------------------------------

def start_unit(out: Path, key: str) -> bool:
    """Get ``out`` ready for the unit of ``key``; True when it holds that unit's unfinished work to resume.

    A directory started under another key (the code, data, params or weights file changed since,
    or a directory of an older dograph that recorded none) is cleared with a warning: nothing made
    under another key is resumed. The key also goes into the checkpoints' fingerprint.
    """
    stamp = out / "unit.json"
    if out.exists():
        try:
            old = read_json(stamp).get("key")
        except (OSError, ValueError, AttributeError):
            old = None
        if old == key:
            return True
        log.warning("%s was started under key %s, this run's key is %s (its inputs changed): clearing it and "
                    "starting again from step 0", out, old or "(none recorded)", key)
        clear_done(out)
        shutil.rmtree(out)
    write_json(stamp, {"key": key})
    return False


def _train_cfg(p: Params, scale: str, seed: int, steps: Optional[int] = None):
    upd: dict[str, Any] = {"scale": scale, "seed": seed}
    if steps:
        upd["steps"] = steps
    if p.train.threads is None and p.pipeline.max_parallel > 1:
        import os

        upd["threads"] = max(1, (os.cpu_count() or 1) // p.pipeline.max_parallel)
    return p.train.model_copy(update=upd)


def _tags(method: str, mtype: str, scale: str, seed: int, data: Mapping[str, Any], stage: str, run_id: str) -> dict[str, str]:
    return {"method": method, "mixer": mtype, "scale": scale, "seed": str(seed), "stage": stage,
            "git_commit": git_commit(_ROOT), "data_version": str(data.get("data_version", "")), "pipeline_run": run_id}


def partition_step(p: Params, name: str, data: Mapping[str, Any], progress: bool = False) -> dict[str, Any]:
    """Partition ``name`` of the tokenized corpus, computed once and stored (``partitions.<name>.out_dir``):
    what training takes (``name``, ``key``, ``dir``), its quality and the lines that print it."""
    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.partition import partition_dir, quality_table, resolve_partition

    corpus = TokenCorpus(data["out_dir"])
    cfg = p.partitions[name]
    cached = (partition_dir(name, cfg, corpus) / "partition.json").exists()
    spec, part = resolve_partition(name, cfg, corpus, progress=progress)
    return {**spec, "kind": part.kind, "quality": part.quality, "table": quality_table(part),
            "cached": cached}


def partition_for(p: Params, spec: Mapping[str, Any], data: Mapping[str, Any]) -> Optional[dict[str, str]]:
    """What a unit passes to training for its method's partition (``{"name", "key", "dir"}``), or None."""
    name = spec.get("partition")
    if not name:
        return None
    r = partition_step(p, name, data)
    return {k: r[k] for k in ("name", "key", "dir")}


def search_step(p: Params, method: str, data: Mapping[str, Any], run_dir: str | Path,
                tracking: Optional[Mapping[str, Any]] = None, seed: int = 0,
                device: Optional[str] = None) -> dict[str, Any]:
    """Find an offline method's mixture at ``pipeline.proxy_scale``; return its weights file.

    ``device`` (e.g. ``cuda:1``, given by the pipeline to spread parallel units over GPUs) replaces
    ``train.device`` for this unit; where a unit runs is not part of its key.
    """
    spec = method_spec(p, method)
    scale = p.pipeline.proxy_scale
    cfg = _train_cfg(p, scale, seed, p.pipeline.search_steps)
    if p.pipeline.search_train:  # e.g. a GPU study's search on the CPU
        from dograph_core.config import TrainConfig

        cfg = TrainConfig.model_validate({**cfg.model_dump(), **p.pipeline.search_train})
    out = Path(run_dir) / "search" / method
    part = partition_for(p, spec, data)
    key = stable_hash({"train": cfg.model_dump(), "method": spec, "data": data["data_version"],
                       "code": _code(data), **_plugin(spec["type"]), **({"partition": part["key"]} if part else {})})
    weights = out / "weights.json"
    if is_done(out, key) and weights.exists():
        info = read_json(out.with_name(out.name + ".done.json"))["info"]
        link_cached(tracking, out, f"{method}@{scale}/search",
                    _tags(method, spec["type"], scale, seed, data, "search", Path(run_dir).name), data,
                    {"train": cfg.model_dump(), "method": spec, "stage": "search"})
        return {"method": method, "weights": str(weights), "time_s": info.get("time_s"), "cached": True}
    if device:
        cfg = cfg.model_copy(update={"device": device})
    from dograph_core.data.corpus import TokenCorpus

    resume = start_unit(out, key)
    tracker = unit_tracker(tracking, out, resume, f"{method}@{scale}/search",
                           _tags(method, spec["type"], scale, seed, data, "search", Path(run_dir).name), data)
    if not getattr(tracker, "reopened", False):
        tracker.log_params({"train": cfg.model_dump(), "method": spec, "stage": "search"})
    corpus = TokenCorpus(data["out_dir"])
    t0 = time.time()
    stage_trackers: list[Any] = []

    def stage_tracker(stage: str) -> Any:  # nested runs for a search made of several trainings
        t = tracker_for(tracking, f"{method}@{scale}/search/{stage}",
                        _tags(method, spec["type"], scale, seed, data, f"search/{stage}", Path(run_dir).name))
        stage_trackers.append(t)
        return t

    try:
        search_fn = search_function(spec["type"])
        if search_fn is not None:  # over the partition's nodes, if the method has one
            view = open_partition(part, corpus, cfg.seq_len) if part else corpus
            call_search(search_fn, cfg, view, out, spec["params"], tracker, stage_tracker, resume=resume)
        else:
            from dograph_core.train import train

            train(cfg, corpus, method, {"type": spec["type"], **spec["params"], **({"partition": part} if part else {})},
                  out, tracker=tracker, resume=resume, key=key)
        if not weights.exists():
            raise RuntimeError(f"search of {method!r} finished without writing {weights}")
        tracker.log_artifact(weights, "weights")
    except BaseException:
        for t in (*stage_trackers, tracker):
            end_tracker(t, "FAILED")
        raise
    for t in stage_trackers:
        end_tracker(t, "FINISHED")
    elapsed = time.time() - t0
    tracker.log_metrics({"search_time_s": elapsed})
    end_tracker(tracker, "FINISHED")
    mark_done(out, key, {"time_s": elapsed})
    return {"method": method, "weights": str(weights), "time_s": elapsed, "cached": False}


def search_function(mixer_type: str):
    """A method's own search (e.g. ``search_doremi``: reference model, then proxy), if it has one."""
    import importlib

    from dograph_core.mixers import mixer_module

    module = mixer_module(mixer_type)
    if not module:
        return None
    return getattr(importlib.import_module(module), f"search_{mixer_type}", None)


def call_search(fn: Any, cfg: Any, corpus: Any, out: Path, params: Mapping[str, Any], tracker: Any,
                stage_tracker: Any, resume: bool) -> Any:
    """Call a method's search function with the method params it accepts (e.g. DoReMi's eta, smoothing).

    Params it does not take (``update_every``, ``reference``, ...) belong to the mixer run inside it.
    """
    import inspect

    sig = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in params.items() if k in sig and k not in ("cfg", "corpus", "out_dir")}
    if "tracker_for" in sig:
        kwargs["tracker_for"] = stage_tracker
    elif "tracker" in sig:
        kwargs["tracker"] = tracker
    if "resume" in sig:
        kwargs["resume"] = resume
    return fn(cfg, corpus, out, **kwargs)


def method_plots(out: Path) -> list[Path]:
    """The PNG figures a training run's mixer wrote (anywhere under its directory but the model)."""
    return sorted(p for p in out.rglob("*.png") if not {"final", "checkpoints"} & set(p.relative_to(out).parts))


def unit_name(method: str, scale: str, seed: int) -> str:
    return f"{method}__{scale}__s{seed}"


def train_step(p: Params, method: str, scale: str, seed: int, data: Mapping[str, Any], run_dir: str | Path,
               search: Optional[Mapping[str, Any]] = None, tracking: Optional[Mapping[str, Any]] = None,
               device: Optional[str] = None, reference: Optional[str] = None) -> dict[str, Any]:
    """Train ``method`` at ``scale``: on the searched mixture (offline methods) or online; evaluate.

    ``device`` replaces ``train.device`` for this unit (see :func:`search_step`); not part of the key.
    ``reference`` (a label of :data:`ROLES`, the unit's directory name): ``uniform_2x``, the compute
    yardstick, is ``method`` at twice ``train.steps``; ``uniform_reorder``, the data-order noise, is
    ``method`` with ``train.data_seed = seed + REORDER_OFFSET``.
    """
    if reference is not None and reference not in ROLES:
        raise ValueError(f"reference {reference!r}: expected one of {sorted(ROLES)}")
    spec = method_spec(p, method)
    if search is not None:
        mtype, mparams = "static", {"path": str(search["weights"])}
        weights_key = file_hash(search["weights"])
    else:
        mtype, mparams, weights_key = spec["type"], spec["params"], None
    cfg = _train_cfg(p, scale, seed, 2 * p.train.steps if reference == YARDSTICK else None)
    if reference == REORDER:
        cfg = cfg.model_copy(update={"data_seed": seed + REORDER_OFFSET})
    label = reference or method
    out = Path(run_dir) / "train" / unit_name(label, scale, seed)
    part = partition_for(p, spec, data)
    if part:  # the mixture (searched or online) is over the partition's nodes
        mparams = {**mparams, "partition": part}
    key = stable_hash({"train": cfg.model_dump(), "method": spec, "mixer": mtype, "weights": weights_key,
                       "data": data["data_version"], "code": _code(data), **_plugin(mtype),
                       **({"partition": part["key"]} if part else {})})
    unit = {"method": label, "scale": scale, "seed": seed, "dir": str(out), "key": key,
            "role": ROLES.get(label, "main"), "search_time_s": (search or {}).get("time_s")}
    run_name = f"{label}@{scale}" + (f"/s{seed}" if seed else "")
    tags = _tags(label, spec["type"], scale, seed, data, "train", Path(run_dir).name)
    if is_done(out, key) and (out / "summary.json").exists():
        link_cached(tracking, out, run_name, tags, data,
                    {"train": cfg.model_dump(), "method": spec, "mixer_used": mtype, "stage": "train"})
        return {**unit, "cached": True}
    if device:
        cfg = cfg.model_copy(update={"device": device})
    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.train import train

    resume = start_unit(out, key)
    tracker = unit_tracker(tracking, out, resume, run_name, tags, data)  # a resumed unit continues its run
    if not getattr(tracker, "reopened", False):
        tracker.log_params({"train": cfg.model_dump(), "method": spec, "mixer_used": mtype, "stage": "train"})
    try:
        if p.pipeline.nproc_per_node > 1:
            summary = train_torchrun(p, cfg, method, {"type": mtype, **mparams}, out, tracker, resume=resume)
        else:
            summary = train(cfg, TokenCorpus(data["out_dir"]), method, {"type": mtype, **mparams}, out,
                            tracker=tracker, resume=resume, key=key)
        if (out / "metrics.jsonl").exists():
            tracker.log_artifact(out / "metrics.jsonl")
        for png in method_plots(out):  # e.g. DoGraph's gradient graph and gradient PCA figures
            tracker.log_artifact(png, "plots")
        log_final_model(p, tracker, out)
    except BaseException:
        end_tracker(tracker, "FAILED")
        raise
    end_tracker(tracker, "FINISHED")
    mark_done(out, key, {"wall_time_s": (summary or {}).get("wall_time_s")})
    if p.pipeline.cleanup:  # the report reads the run's metrics; the model is gone unless MLflow logged it above
        for sub in ("checkpoints", "final"):
            shutil.rmtree(out / sub, ignore_errors=True)
    return {**unit, "cached": False}


def train_torchrun(p: Params, cfg: Any, method: str, method_params: dict, out: Path, tracker: Any,
                   resume: bool) -> dict[str, Any]:
    """One training under ``torchrun --nproc_per_node pipeline.nproc_per_node`` (DDP).

    The run's resolved params (this scale and seed, this method's mixer) go to a params file beside
    ``out`` that ``python -m dograph_core.train`` reads in every process. With MLflow, the launcher
    (:mod:`tasks.train_entry`) gives rank 0 a tracker attached to this unit's run, so metrics stream
    while it trains; other trackers get the run's files afterwards. Every rank's output goes to
    ``out/torchrun.log`` while it runs (appended to on a resume).
    """
    import json
    import os
    import subprocess
    import sys

    from tasks.tracking import MLflowTracker

    import yaml

    raw = p.model_dump()
    raw["train"] = cfg.model_dump()
    raw["methods"][method] = method_params
    pfile = out.with_name(out.name + ".params.yaml")
    pfile.parent.mkdir(parents=True, exist_ok=True)
    pfile.write_text(yaml.safe_dump(raw, sort_keys=False))
    stream = isinstance(tracker, MLflowTracker) and tracker.ok
    env = dict(os.environ)
    if stream:
        env["DOGRAPH_MLFLOW_RUN"] = json.dumps(tracker.run_spec())
    entry = __name__.rsplit(".", 1)[0] + ".train_entry"  # dograph_core.train's main with a tracker
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={p.pipeline.nproc_per_node}",
           "-m", entry, "--params", str(pfile), "--method", method, "--data", p.tokenize.out_dir,
           "--out", str(out)] + (["--resume"] if resume else [])
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "torchrun.log"  # every rank's output as it comes (`tail -f` it), kept after the run
    with open(log_path, "ab") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=Path.cwd(), env=env)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"torchrun training of {method} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"(whole output: {log_path})\n{tail}")
    if not stream:
        _track_from_files(out, tracker)
    return read_json(out / "summary.json")


def _track_from_files(out: Path, tracker: Any) -> None:
    """Send a finished run's step metrics (batched) and files to the tracker (runs in other processes, cached units)."""
    for name in ("summary.json", "eval.json", "weights.json"):
        if (out / name).exists():
            tracker.log_artifact(out / name)
    replay_metrics(out, tracker)


def replay_metrics(out: Path, tracker: Any) -> None:
    """The step metrics of ``metrics.jsonl`` and the final ones of ``eval.json``, in batches where the tracker can."""
    import json

    from dograph_core.outputs import summarize_eval

    records: list[tuple[Any, dict]] = []
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            step = rec.pop("step", None)
            vals = rec.pop("eval", None) or rec
            records.append((step, {k: v for k, v in vals.items() if isinstance(v, (int, float))}))
    if (out / "eval.json").exists() and (out / "summary.json").exists():
        records.append((read_json(out / "summary.json").get("steps"), summarize_eval(read_json(out / "eval.json"), flat=True)))
    batch = getattr(tracker, "log_metric_history", None)
    if batch is not None:
        batch(records)
    else:
        for step, vals in records:
            tracker.log_metrics(vals, step=step)


def unit_tracker(tracking: Optional[Mapping[str, Any]], out: Path, resume: bool, run_name: str,
                 tags: Mapping[str, str], data: Mapping[str, Any]) -> Any:
    """The MLflow run of a unit: on resume the run its directory names (``mlflow_run.json``), reopened
    under this pipeline run, so one run holds the whole curve; else a new nested run, whose id is kept
    there. The corpus is logged as the run's dataset input."""
    run_id = load_run_ref(out, tracking) if resume else None
    tracker = tracker_for(tracking, run_name, tags, run_id=run_id)
    save_run_ref(out, tracker)
    log_corpus = getattr(tracker, "log_corpus", None)
    if log_corpus is not None and data.get("out_dir") and data.get("data_version") and not getattr(tracker, "reopened", False):
        log_corpus(data["out_dir"], str(data["data_version"]))
    return tracker


def link_cached(tracking: Optional[Mapping[str, Any]], out: Path, run_name: str, tags: Mapping[str, str],
                data: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """A unit skipped as finished still shows in this pipeline run: a nested run (tag ``dograph.cached``)
    pointing at the run that trained it (``dograph.original_run_id``), with its params, dataset and metrics
    from the unit's files, so the compare view of every pipeline run holds the whole comparison."""
    if not tracking or not tracking.get("enabled"):
        return
    original = load_run_ref(out, tracking)
    link = {"dograph.cached": "true", "mlflow.note.content":
            f"Skipped as finished: trained in run {original or '(not tracked)'}; its model and files are there."}
    if original:
        link["dograph.original_run_id"] = original
    tracker = tracker_for(tracking, run_name, {**tags, **link})
    tracker.log_params(params)
    log_corpus = getattr(tracker, "log_corpus", None)
    if log_corpus is not None and data.get("out_dir") and data.get("data_version"):
        log_corpus(data["out_dir"], str(data["data_version"]))
    replay_metrics(out, tracker)
    end_tracker(tracker, "FINISHED")


def log_final_model(p: Params, tracker: Any, out: Path) -> None:
    """The run's ``final/`` model: MLflow's transformers flavor (a LoggedModel, optionally registered),
    else a plain artifact; nothing when ``tracking.log_model`` is off or there is no model."""
    if not ((out / "final").is_dir() and p.tracking.log_model):
        return
    log_model = getattr(tracker, "log_model", None)
    if log_model is not None:
        log_model(out / "final", "model", p.tracking.registered_model, card=model_card(out))
    else:
        tracker.log_artifact(out / "final", "model")


def model_card(out: Path) -> str:
    """The logged model's card: what was trained, on what mixture, and how it evaluated (``summary.json``)."""
    s = read_json(out / "summary.json") if (out / "summary.json").exists() else {}
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [dograph, gpt2]", "---",
             f"# {s.get('method', out.name)} at {s.get('scale', '?')}", "",
             "A GPT-2 initialised from scratch and trained by dograph on a domain mixture chosen by the method "
             f"`{s.get('method', '?')}` (mixer `{s.get('mixer', '?')}`). It is a research artefact of a mixture "
             "comparison, not a general-purpose model.", ""]
    facts = [("parameters", "params"), ("steps", "steps"), ("tokens", "tokens"), ("device", "device"),
             ("mean validation loss", "val_loss_mean"), ("worst validation loss", "val_loss_worst"),
             ("worst domain", "val_worst_domain"), ("held-out domain loss", "heldout_val_loss")]
    lines += [f"- {label}: {_fmt(s[key], 4)}" for label, key in facts if s.get(key) is not None]
    if s.get("final_weights"):
        lines += ["", f"Final domain weights: {_fmt(s['final_weights'], 3)}"]
    return "\n".join(lines) + "\n"


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x, digits)}" for k, x in v.items())
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def end_tracker(tracker: Any, status: str) -> None:
    end = getattr(tracker, "end", None)
    if end is not None:
        end(status)
