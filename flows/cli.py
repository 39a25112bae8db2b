"""``dograph``: one entry point for the steps people run by hand, and for the whole flow.

Heavy modules (torch, transformers, prefect, mlflow) are imported inside the commands, so
``dograph --help`` answers at once. Every command reads ``params.yaml`` (``--params``), an
optional preset over it (``--preset``) and ``--set key=value`` overrides, in that order.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

EPILOG = """\
examples:
  dograph run                               the whole pipeline on the default corpus (as `make run`)
  dograph run --preset quick                the same, smaller and faster
  dograph run --set pipeline.methods=[uniform,dograph_model] --set train.steps=500
  dograph prepare --set prepare.source=local --set prepare.local.path=my_corpus/
  dograph train --method dograph_model --scale micro --out runs/manual/dograph_micro
  dograph train --method doge --weights runs/<id>/search/doge/weights.json --scale mini --out runs/manual/doge_mini
  dograph report --run-dir runs/<id>
"""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--params", default="params.yaml", metavar="FILE",
                   help="the params file (default: %(default)s)")
    g.add_argument("--preset", default=None, metavar="NAME",
                   help="a preset merged over the params file (`dograph presets` lists them): quick, nano, gpu, ...")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value, e.g. --set train.steps=100 --set pipeline.methods=[uniform,odm] "
                        "(YAML syntax; repeatable; applied last)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dograph",
        description="Decide the domain mixture of a pretraining corpus (DoGraph, DoReMi, DoGE, ODM, uniform, "
                    "natural), train GPT-2 at several scales on it, and compare.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from dograph_core import __version__

    ap.add_argument("--version", action="version", version=f"dograph {__version__}")
    ap.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None,
                    help="show dograph's own log messages from this level on (INFO: e.g. when DoGraph's model "
                         "nodes come into force or fall back, and why); default: warnings only")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prepare", help="build the documents per domain and split (data/prepared)",
                       description="Fetch (default corpus) or read (local files, a Hugging Face dataset) the text, "
                                   "split it by document into train/val/test per domain. Skipped when the output for "
                                   "the same params exists.")
    _common(p)
    p.add_argument("--force", action="store_true", help="run even if the output for these params exists")

    p = sub.add_parser("tokenize", help="train the tokenizer and write the token shards (data/tokenized)",
                       description="Train a byte-level BPE (or load one) and write one token shard per domain and "
                                   "split; prints the corpus table.")
    _common(p)
    p.add_argument("--force", action="store_true", help="run even if the output for these params exists")

    p = sub.add_parser("partition", help="compute named partitions of the corpus (what a domain is) and print their quality",
                       description="Compute the partitions defined under 'partitions' in the params (human, text, "
                                   "hidden, file), store them under their out_dir, and print each one's balance and "
                                   "agreement with the sources (ARI, NMI). A method trains over one with "
                                   "`partition: NAME`. Skipped when the partition for the same settings and data exists.")
    _common(p)
    p.add_argument("names", nargs="*", metavar="NAME", help="partitions to compute (default: every one defined)")
    p.add_argument("--used", action="store_true",
                   help="only the partitions the pipeline's methods mix over (what dvc.yaml's partition stage runs)")

    p = sub.add_parser("scales", help="list the model scales and their sizes at the configured vocabulary")
    _common(p)

    sub.add_parser("presets", help="list the presets (--preset NAME) and the directory they are read from")

    p = sub.add_parser("train", help="train one model at one scale with one method's mixture",
                       description="Train GPT-2 from scratch on the tokenized corpus with a method's mixture, "
                                   "then evaluate it per domain. Writes final/ (Hugging Face model and tokenizer), "
                                   "metrics.jsonl, eval.json, weights.json and summary.json under --out.")
    _common(p)
    p.add_argument("--method", required=True,
                   help="a method defined under 'methods' in the params (e.g. dograph_model, odm) or a mixer type")
    p.add_argument("--scale", default=None, help="model scale (default: train.scale); see `dograph scales`")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: train.seed)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="train on a fixed mixture from this weights file (a search's weights.json) instead of running the method")
    p.add_argument("--schedule", action="store_true", help="with --weights: replay the file's schedule over the run")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory of this run")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--track", action="store_true", help="log to MLflow (tracking.uri / $MLFLOW_TRACKING_URI / sqlite:///mlflow.db)")

    p = sub.add_parser("search", help="find an offline method's mixture on the proxy scale (writes weights.json)",
                       description="Run a method's mixture search (DoReMi, DoGE, or any method trained online) at the "
                                   "proxy scale; the resulting weights.json is what `train --weights` reads.")
    _common(p)
    p.add_argument("--method", required=True, help="a method defined under 'methods' in the params")
    p.add_argument("--scale", default=None, help="proxy scale (default: pipeline.proxy_scale)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (weights.json goes here)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")

    p = sub.add_parser("evaluate", help="evaluate a trained model per domain, or any model's bits per byte on text",
                       description="Load a trained model (a train run's directory or its final/) and report "
                                   "per-domain loss, mean, worst and held-out loss, and last-word accuracy. "
                                   "With --text DIR: bits per byte of any Hugging Face causal LM (with its own "
                                   "tokenizer) on every text file under DIR, per file, mean and pooled; "
                                   "tokenizer-independent, so models with different vocabularies compare.")
    _common(p)
    p.add_argument("model", help="a train output directory or a Hugging Face model directory")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the evaluation as JSON here")
    p.add_argument("--text", default=None, metavar="DIR", help="score bits per byte on the UTF-8 text files under DIR")
    p.add_argument("--glob", default="**/*", metavar="PATTERN", help="with --text: which files (default: all, "
                                                                      "hidden ones excepted)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="with --text: tokens of context per window (default: the model's n_positions)")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="run lm-evaluation-harness tasks (comma-separated, e.g. arc_easy,hellaswag,piqa,sciq,"
                        "lambada_openai; those need hub access) on the model; needs the lm-eval extra")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR",
                   help="with --lm-eval: a directory of task YAML files of your own (local data files run offline)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="with --lm-eval: at most N examples per task")

    p = sub.add_parser("report", help="(re)write the comparison report of a pipeline run",
                       description="Collect every finished training run of a run directory and write report.md, "
                                   "results.json, metrics.json (what `dvc metrics show` reads) and plots/ there; "
                                   "print the table.")
    _common(p)
    p.add_argument("--run-dir", required=True, metavar="DIR", help="a pipeline run directory, e.g. runs/default-1a2b3c4d "
                   "(give the run's --preset/--set too: its scale order and ablation parents shape the tables)")
    _publish(p)

    p = sub.add_parser("run", help="run the whole pipeline (Prefect flow) and print the comparison",
                       description="prepare -> tokenize -> per method: search at the proxy scale -> train at each "
                                   "target scale -> evaluate -> report. Finished work is skipped on a re-run.")
    _common(p)
    p.add_argument("--run-id", default=None,
                   help="name of the run directory under pipeline.out_dir (default: <preset>-<hash of the params>; "
                        "the same params resume the same run)")
    p.add_argument("--skip-data", action="store_true", help="use the tokenized corpus as it is (no prepare/tokenize)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    _publish(p)
    return ap


def _publish(p: argparse.ArgumentParser) -> None:
    p.add_argument("--publish", default=None, metavar="DIR",
                   help="also write the report as a directory that stands alone (report.md, results.json, plots/, "
                        "logs.tar.gz), e.g. docs/results/cpu")


# -- commands -----------------------------------------------------------------------------------

def _params(a: argparse.Namespace):
    from dograph_core.config import load_params

    return load_params(a.params, a.preset, a.overrides)


def _data_lock(*dirs: str, exclusive: bool) -> Any:
    """The data locks a pipeline takes (shared to read, exclusive to rewrite), held while a command works."""
    from tasks.cache import DataLock

    return DataLock(*dirs).acquire(exclusive=exclusive)


def cmd_prepare(a: argparse.Namespace) -> int:
    from tasks.cache import is_done
    from tasks.steps import data_keys, prepare_step

    p = _params(a)
    with _data_lock(p.prepare.out_dir, exclusive=a.force or not is_done(p.prepare.out_dir, data_keys(p)[0])):
        res = prepare_step(p, progress=not a.quiet, force=a.force)
    print(f"prepared data in {res['out_dir']}" + (" (up to date, skipped)" if res["cached"] else ""))
    return 0


def cmd_tokenize(a: argparse.Namespace) -> int:
    from dograph_core.data.tokenize import print_corpus_table
    from dograph_core.io import read_json
    from tasks.steps import data_up_to_date, prepare_step, tokenize_step

    p = _params(a)
    with _data_lock(p.prepare.out_dir, p.tokenize.out_dir, exclusive=a.force or not data_up_to_date(p)):
        prepared = prepare_step(p, progress=not a.quiet)
        res = tokenize_step(p, prepared, progress=not a.quiet, force=a.force)
    if res["cached"]:
        print_corpus_table(read_json(Path(res["out_dir"]) / "corpus.json"))
        print(f"tokenized corpus in {res['out_dir']} (up to date, skipped)")
    return 0


def cmd_partition(a: argparse.Namespace) -> int:
    from dograph_core.config import ConfigError
    from tasks.steps import partition_step

    p = _params(a)
    if a.used:
        from tasks.params import method_spec

        names = list(dict.fromkeys(n for m in p.pipeline.all_methods() if (n := method_spec(p, m).get("partition"))))
        if not names:
            print("no method of the pipeline mixes over a partition: nothing to compute")
    else:
        names = a.names or list(p.partitions)
    unknown = [n for n in names if n not in p.partitions]
    if unknown or not (names or a.used):
        raise ConfigError(f"partitions {unknown or '(none)'}: not defined under 'partitions' in {a.params} "
                          f"(defined: {sorted(p.partitions)})")
    with _data_lock(p.tokenize.out_dir, exclusive=False):
        for name in names:
            r = partition_step(p, name, {"out_dir": p.tokenize.out_dir}, progress=not a.quiet)
            print(r["table"])
            print(f"  stored in {r['dir']}" + (" (up to date, skipped)" if r["cached"] else ""))
    return 0


def _with_partition(p: Any, spec: dict, mparams: dict) -> dict:
    """``mparams`` plus the method's partition (computed if needed), as training takes it."""
    from tasks.steps import partition_for

    part = partition_for(p, spec, {"out_dir": p.tokenize.out_dir})
    return {**mparams, "partition": part} if part else mparams


def cmd_scales(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dograph_core.model import scale_table

    p = _params(a)
    t = Table(title=f"GPT-2 scales at vocabulary {p.tokenize.vocab_size}, context {p.train.seq_len}")
    for c in ("scale", "layers", "width", "heads", "params", "params (GPT-2 vocab)", "note"):
        t.add_column(c)
    for r in scale_table(p.tokenize.vocab_size, p.train.seq_len):
        t.add_row(r["scale"], str(r["layers"]), str(r["width"]), str(r["heads"]), f"{r['params'] / 1e6:.2f}M",
                  f"{r['params_gpt2_vocab'] / 1e6:.0f}M", r["note"])
    Console().print(t)
    return 0


def cmd_presets(a: argparse.Namespace) -> int:
    from dograph_core.config import list_presets, preset_dir

    for name, f in list_presets().items():
        about = next((ln.lstrip("# ").strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
        print(f"  {name:10s} {about}")
    print(f"presets in {preset_dir()}; the default preset is the params file itself")
    return 0


def _check_scale(scale: Optional[str]) -> None:
    """``--scale`` is checked with the other settings, before any data or model is loaded."""
    from dograph_core.config import ConfigError
    from dograph_core.model import SCALES

    if scale is not None and scale not in SCALES:
        raise ConfigError(f"--scale {scale!r}: unknown scale; expected one of {list(SCALES)} (see `dograph scales`)")


def _tracker(p: Any, on: bool, name: str, tags: dict) -> Any:
    if not on:
        from dograph_core.tracking import NullTracker

        return NullTracker()
    from tasks.tracking import MLflowTracker, git_commit

    return MLflowTracker(p.tracking.uri, p.tracking.experiment, run_name=name, tags={**tags, "git_commit": git_commit()})


def cmd_train(a: argparse.Namespace) -> int:
    from dograph_core.config import ConfigError

    p = _params(a)  # bad params fail here, before torch and transformers are imported (seconds)
    _check_scale(a.scale)
    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.mixers import registry
    from dograph_core.train import train
    from tasks.params import check_params, method_spec
    from tasks.steps import end_tracker, log_final_model

    if a.method in p.methods:
        check_params(p, methods=[a.method])
        spec = method_spec(p, a.method)
    elif a.method in registry():
        spec = {"type": a.method, "params": {}}
    else:
        raise ConfigError(f"--method {a.method!r}: not under 'methods' in {a.params} ({sorted(p.methods)}) "
                          f"and not a mixer type ({sorted(registry())})")
    mtype, mparams = spec["type"], spec["params"]
    if a.weights:
        mtype, mparams = "static", {"path": a.weights, "use_schedule": a.schedule}
    upd: dict[str, Any] = {"progress": not a.quiet}
    if a.scale:
        upd["scale"] = a.scale
    if a.seed is not None:
        upd["seed"] = a.seed
    cfg = p.train.model_copy(update=upd)
    tracker = _tracker(p, a.track, f"{a.method}@{cfg.scale}", {"method": a.method, "scale": cfg.scale, "stage": "train"})
    tracker.log_params({"train": cfg.model_dump(), "method": spec, "mixer_used": mtype})
    try:
        with _data_lock(p.tokenize.out_dir, exclusive=False):
            summary = train(cfg, TokenCorpus(p.tokenize.out_dir), a.method,
                            {"type": mtype, **_with_partition(p, spec, mparams)}, a.out, tracker=tracker, resume=a.resume)
    except BaseException:
        end_tracker(tracker, "FAILED")
        raise
    log_final_model(p, tracker, Path(a.out))
    end_tracker(tracker, "FINISHED")
    print(f"trained {a.method} at {cfg.scale}: {a.out}")
    for k in ("val_loss_mean", "val_loss_worst", "wall_time_s"):
        if isinstance(summary, dict) and k in summary:
            print(f"  {k}: {summary[k]}")
    return 0


def cmd_search(a: argparse.Namespace) -> int:
    from dograph_core.data.corpus import TokenCorpus
    from tasks.params import check_params, method_spec
    from tasks.steps import search_function, call_search

    p = _params(a)
    _check_scale(a.scale)
    check_params(p, methods=[a.method])
    spec = method_spec(p, a.method)
    cfg = p.train.model_copy(update={"scale": a.scale or p.pipeline.proxy_scale, "progress": not a.quiet,
                                     **({"steps": p.pipeline.search_steps} if p.pipeline.search_steps else {})})
    with _data_lock(p.tokenize.out_dir, exclusive=False):
        corpus = TokenCorpus(p.tokenize.out_dir)
        search = search_function(spec["type"])
        mparams = _with_partition(p, spec, spec["params"])
        if search is not None:
            from dograph_core.partition import open_partition
            from dograph_core.tracking import NullTracker

            part = mparams.pop("partition", None)
            call_search(search, cfg, open_partition(part, corpus, cfg.seq_len) if part else corpus, Path(a.out),
                        mparams, NullTracker(), lambda stage: NullTracker(), a.resume)
        else:  # any method's training run leaves the weights it used in weights.json
            from dograph_core.train import train

            train(cfg, corpus, a.method, {"type": spec["type"], **mparams}, a.out, resume=a.resume)
    print(f"weights: {Path(a.out) / 'weights.json'}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from dograph_core.config import ConfigError
    from dograph_core.distributed import resolve_device
    from dograph_core.io import OutputError, writable_dir, write_json

    p = _params(a)
    device = resolve_device(p.train.device)  # as in training: train.device=auto takes the GPU when there is one
    if a.out:  # before the evaluation, not after it
        if Path(a.out).is_dir():
            raise OutputError(f"--out {a.out} is a directory; give a file name, e.g. {Path(a.out) / 'eval.json'}")
        writable_dir(Path(a.out).parent)
    if a.text is not None and a.lm_eval is not None:
        raise ConfigError("--text and --lm-eval: give one of them per call")
    mode = "--text" if a.text is not None else "--lm-eval" if a.lm_eval is not None else None
    given = {"--glob": (a.glob if a.glob != "**/*" else None, "--text"), "--context": (a.context, "--text"),
             "--limit": (a.limit, "--lm-eval"), "--lm-eval-include": (a.lm_eval_include, "--lm-eval")}
    extra = [flag for flag, (value, owner) in given.items() if value is not None and owner != mode]
    if extra:
        raise ConfigError(f"{', '.join(extra)}: not used {'with ' + mode if mode else 'without --text or --lm-eval'}")
    for flag, value in (("--context", a.context), ("--limit", a.limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if mode is not None:
        res = _evaluate_text(a, device) if mode == "--text" else _evaluate_lm_eval(a, device)
    else:
        res = _evaluate_corpus(a, p, device)
    if a.out:
        write_json(a.out, res)
    return 0


def _evaluate_corpus(a: argparse.Namespace, p, device) -> dict:
    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.evaluate import evaluate_final, load_model

    with _data_lock(p.tokenize.out_dir, exclusive=False):
        corpus = TokenCorpus(p.tokenize.out_dir)
        model = load_model(a.model, corpus).to(device)  # refuses another tokenizer's model or a truncated file
        seq_len = min(p.train.seq_len, model.config.n_positions)
        res = evaluate_final(model, corpus, corpus.train_domains, corpus.heldout_domains, seq_len,
                             p.train.eval_windows, device)
    val = res["val"]
    for d, v in {**val["domains"], **val["heldout"]}.items():
        print(f"  {d:24s} val loss {v['loss']:.4f}" + ("   (held out)" if d in val["heldout"] else ""))
    print(f"  mean {val['loss_mean']:.4f}   worst {val['loss_worst']:.4f} ({val['worst_domain']})")
    return res


def _evaluate_text(a: argparse.Namespace, device) -> dict:
    from dograph_core.textscore import bits_per_byte, load_scorer, read_texts

    texts = read_texts(a.text, a.glob)  # before the model loads: a bad directory fails in a second
    model, tokenizer = load_scorer(a.model)
    res = bits_per_byte(model.to(device), tokenizer, texts, device, context=a.context,
                        progress=lambda name: print(f"  scoring {name}", file=sys.stderr))
    res["model"] = str(a.model)
    res["text"] = str(a.text)
    for name, v in res["files"].items():
        flag = "" if v["lossless"] else "   (tokenizer not lossless on this file)"
        print(f"  {name:32s} {v['bits_per_byte']:.4f} bits/byte   {v['tokens']} tokens, {v['bytes']} bytes{flag}")
    for name in res["skipped"]:
        print(f"  {name:32s} skipped (empty)")
    print(f"  mean {res['bits_per_byte_mean']:.4f} bits/byte over {len(res['files'])} files   "
          f"pooled {res['bits_per_byte_pooled']:.4f}   context {res['context']} tokens")
    return res


def _evaluate_lm_eval(a: argparse.Namespace, device) -> dict:
    from dograph_core.lmeval import run_lm_eval

    tasks = [t.strip() for t in a.lm_eval.split(",") if t.strip()]
    res = run_lm_eval(a.model, tasks, device=str(device), include=a.lm_eval_include, limit=a.limit)
    for task, metrics in res["results"].items():
        shown = "   ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                           if isinstance(v, float) and "stderr" not in k)
        print(f"  {task:24s} {shown}   (n {res['n_samples'].get(task, {}).get('effective', '?')})")
    return res


def cmd_report(a: argparse.Namespace) -> int:
    from rich.console import Console

    from dograph_core.config import REORDER, ROLES, YARDSTICK
    from dograph_core.report import comparison_rows, rich_table
    from tasks.results import write_outputs

    p = _params(a)
    run_dir = Path(a.run_dir)
    units = []
    for d in sorted((run_dir / "train").glob("*__*__s*")):
        marker = d.with_name(d.name + ".done.json")
        if d.is_dir() and marker.exists():
            method, scale, seed = d.name.split("__")
            units.append({"method": method, "scale": scale, "seed": int(seed[1:]), "dir": str(d),
                          "role": ROLES.get(method, "main"),
                          "search_time_s": _search_time(run_dir, method)})
    if not units:
        raise FileNotFoundError(f"{run_dir}: no finished training runs (train/<method>__<scale>__s<seed>/ with a done marker)")
    scales, methods = p.pipeline.target_scales, [*p.pipeline.all_methods(), YARDSTICK, REORDER]  # the params' order
    units.sort(key=lambda u: (scales.index(u["scale"]) if u["scale"] in scales else len(scales), u["scale"],
                              methods.index(u["method"]) if u["method"] in methods else len(methods), u["method"],
                              u["seed"]))
    results, report = write_outputs(run_dir.name, units, run_dir, p.tokenize.out_dir, p.model_dump(), a.publish)
    Console(width=None if sys.stdout.isatty() else 132).print(rich_table(comparison_rows(results)))
    print(f"report: {report}")
    return 0


def _search_time(run_dir: Path, method: str) -> Optional[float]:
    from dograph_core.io import read_json

    m = run_dir / "search" / f"{method}.done.json"
    return read_json(m).get("info", {}).get("time_s") if m.exists() else None


def cmd_run(a: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a busy machine starts slowly
    if a.quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from dograph_core.config import check_name
    from dograph_core.io import writable_dir
    from tasks.params import check_params

    p = _params(a)
    if a.run_id is not None:
        check_name(a.run_id, "--run-id")  # a directory under pipeline.out_dir, never a path out of it
    check_params(p)  # bad params and an unwritable output fail here, before a Prefect server starts
    writable_dir(p.pipeline.out_dir)
    if a.skip_data:
        from tasks.steps import require_corpus

        require_corpus(p)
    from rich.console import Console

    from dograph_core.report import rich_table
    from flows.pipeline import pipeline

    _interrupts_stop_training()
    _temporary_server()
    overrides = list(a.overrides) + (["train.progress=false"] if a.quiet else [])
    res = pipeline(params=a.params, preset=a.preset, overrides=overrides, run_id=a.run_id,
                   skip_data=a.skip_data, track=not a.no_track, publish=a.publish)
    con = Console(width=None if sys.stdout.isatty() else 132)  # a log file gets the whole table
    con.print(rich_table(res["rows"]))
    con.print(f"run {res['run_id']} in {res['time_s']:.0f} s ({res['cached']} of {res['units']} trainings reused from before)")
    con.print("where to look next:")
    con.print(f"  report:   {res['report']}  (plots in {Path(res['report']).parent / 'plots'})")
    if a.publish:
        con.print(f"  published: {a.publish}/report.md")
    if res["mlflow_ui"]:
        con.print(f"  MLflow:   {res['mlflow_ui']}")
    if res["tracking_error"]:
        con.print(f"  [yellow]MLflow tracking failed: {res['tracking_error']} (results above are complete)[/yellow]")
    con.print(f"  rerun:    the same command resumes run {res['run_id']} and skips finished work")
    return 0


def _interrupts_stop_training() -> None:
    """Ctrl-C stops the flow, and every training of this process at its next step with a checkpoint
    (:data:`dograph_core.train.STOP`); a second Ctrl-C exits at once.

    Either way nothing finished is lost: done markers and checkpoints are written atomically, and
    the same command resumes.
    """
    import os
    import signal

    from dograph_core.train import STOP

    STOP.clear()

    def handler(signum: int, frame: Any) -> None:
        if STOP.is_set():
            print("\nstopped; run the same command again to resume", file=sys.stderr)
            os._exit(130)
        STOP.set()
        print("\ninterrupted: stopping after the current training step (Ctrl-C again to stop at once)", file=sys.stderr)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


# Run by the watchdog of the temporary Prefect server: stdin closes when dograph ends, however it ends.
_WATCHDOG = """import os, signal, sys
sys.stdin.buffer.read()
try:
    os.kill(int(sys.argv[1]), signal.SIGTERM)
except ProcessLookupError:
    pass
"""
_watchdogs: list[Any] = []


def _temporary_server() -> None:
    """Start Prefect's temporary API server now, with a watchdog that stops it when this process ends.

    Prefect starts it on first use and stops it at a normal exit; an exit at once (a second Ctrl-C),
    SIGTERM or SIGKILL skips that and would leave it running on its port. The watchdog (in its own
    session, so Ctrl-C does not reach it) waits on a pipe from this process and stops the server
    when the pipe closes. Nothing to do with a real server (``PREFECT_API_URL``).
    """
    import subprocess

    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's clients use
    server.start()
    _watchdogs.append(subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(server.server_process.pid)],
                                       stdin=subprocess.PIPE, start_new_session=True))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prepare": cmd_prepare, "tokenize": cmd_tokenize, "partition": cmd_partition, "scales": cmd_scales, "train": cmd_train,
    "search": cmd_search, "evaluate": cmd_evaluate, "report": cmd_report, "run": cmd_run,
    "presets": cmd_presets,
}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_level:
        from tasks.logs import show_logs

        show_logs(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        again = "the same command with --resume" if args.command in ("train", "search") else "the same command again"
        print(f"interrupted; run {again} to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - known bad input becomes a message, anything else a traceback
        from dograph_core.config import ConfigError

        if isinstance(e, ConfigError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, (ValueError, OSError, RuntimeError)) and not isinstance(e, NotImplementedError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
