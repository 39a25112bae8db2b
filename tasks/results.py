"""Gather every training run's outputs into the results document that :mod:`dograph_core.report` reads."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from dograph_core.io import read_json


def run_record(unit: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of ``results["runs"]`` from a finished training run's directory (:func:`dograph_core.study.run_record`,
    plus where it is, whether this pipeline run reused it and the method's own figures)."""
    from dograph_core.study import run_record as study_record
    from tasks.steps import method_plots

    out = Path(unit["dir"])
    for name in ("summary.json", "eval.json"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name}: missing; run this training again (the same command resumes it)")
    try:
        rec = study_record(out, unit["method"], unit["scale"], int(unit.get("seed", 0)), unit.get("role", "main"),
                           unit.get("search_time_s"))
    except (KeyError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError, a missing field: name the run
        raise ValueError(f"{out}: unreadable results ({e}); run this training again to rewrite them") from None
    return {**rec, "dir": str(out), "cached": bool(unit.get("cached")), "plots": [str(p) for p in method_plots(out)]}


def collect_results(run_id: str, units: Iterable[Mapping[str, Any]], tokenized_dir: str | Path,
                    params: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    meta = read_json(Path(tokenized_dir) / "corpus.json")
    runs = [run_record(u) for u in units]
    return {
        "run_id": run_id,
        "domains": list(meta["train_domains"]),
        "heldout": list(meta.get("heldout_domains", [])),
        "params": dict(params or {}),
        "runs": runs,
        "partitions": partition_records(params or {}, {r["method"] for r in runs}, tokenized_dir),
    }


def partition_records(params: Mapping[str, Any], methods: set[str], tokenized_dir: str | Path) -> dict[str, Any]:
    """The quality of each partition the runs' methods mixed over (``{}`` when they all used the sources)."""
    names = dict.fromkeys(n for m, spec in (params.get("methods") or {}).items()
                          if m in methods and (n := spec.get("partition")))
    if not names:
        return {}
    import numpy as np

    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.partition import Partition, PartitionConfig, PartitionError, partition_dir

    corpus = TokenCorpus(tokenized_dir)
    share = np.asarray(corpus.natural_weights)
    out: dict[str, Any] = {"human": {"kind": "human", "nodes": len(share), "balance": float(share.min() / share.max()),
                                     "entropy": float(-(share * np.log(share)).sum() / np.log(len(share))),
                                     "ari": 1.0, "nmi": 1.0, "token_share": dict(zip(corpus.train_domains, share.tolist()))}}
    for name in names:
        try:
            part = Partition.load(partition_dir(name, PartitionConfig(**params["partitions"][name]), corpus))
        except (PartitionError, KeyError, TypeError) as e:  # changed or not on this machine: the report goes on
            logging.getLogger(__name__).warning("partition %s: not in the report (%s)", name, e)
            continue
        q = part.quality
        out[name] = {"kind": part.kind, "key": part.key, **{k: q.get(k) for k in ("nodes", "balance", "entropy", "ari", "nmi")},
                     "token_share": q.get("token_share")}
    return out


def write_outputs(run_id: str, units: Iterable[Mapping[str, Any]], run_dir: str | Path, tokenized_dir: str | Path,
                  params: Optional[Mapping[str, Any]] = None, publish: Optional[str | Path] = None
                  ) -> tuple[dict[str, Any], Path]:
    """The report of a run directory: ``report.md`` and its plots, and ``metrics.json`` for DVC.
    ``publish``: also a self-contained copy of the report there (:func:`publish_results`).
    Returns the results document and the report's path."""
    from dograph_core.io import write_json
    from dograph_core.report import write_report

    results = collect_results(run_id, units, tokenized_dir, params)
    report = write_report(results, run_dir, title=f"dograph comparison, run {run_id}")
    write_json(Path(run_dir) / "metrics.json", dvc_metrics(results))
    if publish is not None:
        publish_results(results, run_dir, publish)
    return results, report


def publish_results(results: Mapping[str, Any], run_dir: str | Path, out: str | Path) -> Path:
    """The report as a directory that stands alone (e.g. ``docs/results/<preset>``): ``report.md``,
    ``results.json`` (paths relative to the run directory), ``plots/`` (with the methods' own figures of
    each scale's first seed, copied) and ``logs.tar.gz`` with every run's step metrics, DoGraph's update
    log and the searched mixtures. Written beside ``out`` and swapped in whole: what was there before is
    replaced, and a failure leaves it as it was."""
    import shutil
    import tarfile
    import tempfile

    from dograph_core.report import write_report
    from dograph_core.study import first_seeds

    out, run_dir = Path(out), Path(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        firsts = {id(r) for r in first_seeds(results["runs"])}
        runs = []
        for r in results["runs"]:
            copied = []
            for f in map(Path, r.get("plots") or []) if id(r) in firsts else []:
                dst = tmp / "plots" / f"{r['method']}__{r['scale']}" / f.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dst)
                copied.append(str(dst))
            runs.append({**r, "plots": copied})
        write_report({**results, "runs": runs}, tmp, title=f"dograph comparison, run {results['run_id']}")
        with tarfile.open(tmp / "logs.tar.gz", "w:gz") as tar:
            for r in results["runs"]:
                d = Path(r["dir"])
                for f in (d / "metrics.jsonl", d / "mixer" / "dograph_log.jsonl"):
                    if f.is_file():
                        tar.add(f, arcname=str(f.relative_to(run_dir)) if f.is_relative_to(run_dir) else f.name)
            for f in sorted(run_dir.glob("search/*/weights.json")):
                tar.add(f, arcname=str(f.relative_to(run_dir)))
        _relative_paths(tmp / "results.json", tmp, run_dir)
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "report.md"


def _relative_paths(results_file: Path, root: Path, run_dir: Path) -> None:
    """A published ``results.json`` without this machine's paths: figures relative to the published
    directory, run directories relative to the run's."""
    from dograph_core.io import write_json

    doc = read_json(results_file)
    for r in doc.get("runs", []):
        r["plots"] = [str(Path(p).relative_to(root)) for p in r.get("plots") or []]
        d = Path(r["dir"])
        r["dir"] = str(d.relative_to(run_dir)) if d.is_relative_to(run_dir) else d.name
    write_json(results_file, doc)


def dvc_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """A flat, small metrics document for ``dvc metrics show``: method -> scale -> numbers."""
    from dograph_core.report import comparison_rows

    import math

    def num(x: float) -> Optional[float]:
        return round(float(x), 5) if x is not None and math.isfinite(x) else None

    out: dict[str, Any] = {}
    for r in comparison_rows(dict(results)):
        out.setdefault(r["method"], {})[r["scale"]] = {
            "val_loss_mean": num(r["val_mean"]), "val_loss_worst": num(r["val_worst"]),
            "heldout_loss": num(r["heldout"]), "train_time_s": num(r["train_s"]),
        }
    return out
