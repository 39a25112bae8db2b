"""Gather every training run's outputs into the results document that :mod:`dograph_core.report` reads."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from dograph_core.io import read_json

VAL_PREFIX = "val_loss/"


def _read(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return read_json(path)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: name the file
        raise ValueError(f"{path}: not JSON ({e}); run this training again to rewrite it") from None


def _losses(split: Mapping[str, Any], part: str) -> dict[str, float]:
    """``{"domains": {d: {"loss": x}}}`` (evaluate.evaluate_split) -> ``{d: x}``."""
    return {d: float(v["loss"] if isinstance(v, Mapping) else v) for d, v in (split.get(part) or {}).items()}


def _curves(metrics_file: Path) -> list[dict[str, Any]]:
    """Steps of metrics.jsonl that carry per-domain validation losses (``val_loss/<domain>``)."""
    pts: list[dict[str, Any]] = []
    if not metrics_file.exists():
        return pts
    for line in metrics_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec.get("eval"), dict):  # eval lines: {"step": s, "eval": {"val_loss/<d>": ...}}
            rec = {"step": rec.get("step"), **rec["eval"]}
        vals = {k[len(VAL_PREFIX):]: float(v) for k, v in rec.items() if k.startswith(VAL_PREFIX) and v is not None}
        held = {k[len("heldout_loss/"):]: float(v) for k, v in rec.items() if k.startswith("heldout_loss/") and v is not None}
        if vals and "step" in rec:
            pts.append({"step": int(rec["step"]), "val_loss": {**vals, **held}})
    return pts


def run_record(unit: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of ``results["runs"]`` from a finished training run's directory."""
    out = Path(unit["dir"])
    ev = _read(out / "eval.json") or {}
    summary = _read(out / "summary.json") or {}
    weights = _read(out / "weights.json") or {}
    val = ev.get("val") or {}
    rec: dict[str, Any] = {
        "method": unit["method"],
        "scale": unit["scale"],
        "seed": unit.get("seed", 0),
        "dir": str(out),
        "cached": bool(unit.get("cached")),
        "val_loss": _losses(val, "domains"),
        "heldout_loss": _losses(val, "heldout"),
        "wall_time_s": summary.get("wall_time_s", summary.get("time_s")),
        "steps": summary.get("steps"),
        "search_time_s": unit.get("search_time_s"),
        "weights": weights.get("weights"),
        "weights_history": [[s["step"], s["weights"]] for s in weights.get("schedule", [])],
        "curves": _curves(out / "metrics.jsonl"),
    }
    if rec["val_loss"] and summary.get("steps"):  # the final evaluation ends the curves
        rec["curves"].append({"step": int(summary["steps"]), "val_loss": {**rec["val_loss"], **rec["heldout_loss"]}})
    from tasks.steps import method_plots

    rec["plots"] = [str(p) for p in method_plots(out)]
    if ev.get("last_word_mean") is not None:
        rec["last_word_accuracy"] = ev["last_word_mean"]
    return rec


def collect_results(run_id: str, units: Iterable[Mapping[str, Any]], tokenized_dir: str | Path,
                    params: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    meta = read_json(Path(tokenized_dir) / "corpus.json")
    return {
        "run_id": run_id,
        "domains": list(meta["train_domains"]),
        "heldout": list(meta.get("heldout_domains", [])),
        "params": dict(params or {}),
        "runs": [run_record(u) for u in units],
    }


def write_outputs(run_id: str, units: Iterable[Mapping[str, Any]], run_dir: str | Path, tokenized_dir: str | Path,
                  params: Optional[Mapping[str, Any]] = None) -> tuple[dict[str, Any], Path]:
    """The report of a run directory: ``report.md`` and its plots, and ``metrics.json`` for DVC.
    Returns the results document and the report's path."""
    from dograph_core.io import write_json
    from dograph_core.report import write_report

    results = collect_results(run_id, units, tokenized_dir, params)
    report = write_report(results, run_dir, title=f"dograph comparison, run {run_id}")
    write_json(Path(run_dir) / "metrics.json", dvc_metrics(results))
    return results, report


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
