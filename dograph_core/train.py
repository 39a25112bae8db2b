"""The training engine every mixing method runs inside.

``train(cfg, corpus, method, method_params, out_dir)`` trains a GPT-2 of ``cfg.scale`` from scratch
on the mixture a mixer chooses, and writes into ``out_dir``::

    checkpoints/step_*.pt   model, optimizer, scheduler, sampler, RNG and mixer state (weights_only)
    final/                  the model (safetensors) and tokenizer in Hugging Face format
    metrics.jsonl           one line per logged step (loss, lr, tok/s, weights, batch checksum) and eval
    eval.json               final val/test loss and perplexity per domain, mean, worst, held-out, last-word accuracy
    weights.json            the mixer's result (the format the ``static`` mixer reads)
    summary.json            wall time, tokens/s, parameters, final metrics, realised mixture

Run it alone or under ``torchrun --nproc_per_node=N -m dograph_core.train --params params.yaml``.
The loop itself (mixture sampling, resume, DDP) is described in ``sampling.py``, ``checkpoint.py``
and ``mixers/base.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dograph_core.checkpoint import (
    from_storable, latest_checkpoint, load_latest, rng_state, save_checkpoint, set_rng_state,
)
from dograph_core.config import TrainConfig
from dograph_core.distributed import DistInfo, barrier, cleanup, init_distributed, make_reduce, mean_scalar, resolve_device
from dograph_core.evaluate import evaluate_final, evaluate_split, split_metrics
from dograph_core.io import RunLock, remove_leftovers, writable_dir, write_json
from dograph_core.microstep import LMLoss, micro_step
from dograph_core.mixers import build_mixer
from dograph_core.mixers.base import MixerContext, write_weights
from dograph_core.model import build_model, count_params
from dograph_core.outputs import MetricsLog, save_final, summarize_eval
from dograph_core.partition import open_partition
from dograph_core.sampling import MixtureSampler, rank_slice
from dograph_core.tracking import NullTracker, Tracker

# Config keys that may change between a run and its resumption (they do not change the numbers).
RUNTIME_KEYS = {"eval_every", "eval_windows", "ckpt_every", "progress", "threads", "device", "compile", "log_every"}


# Set (by a Ctrl-C handler, say) to stop every training of this process at its next step, with a checkpoint.
STOP = threading.Event()


class TrainError(RuntimeError):
    """The run cannot start or continue (bad setup, diverged loss)."""


class TrainInterrupted(TrainError):
    """Training stopped on request (:data:`STOP`) after writing a checkpoint; resume it later."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (1-based): linear warmup, then cosine to ``min_lr_ratio``."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return step / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW (decay on matrices only) and the warmup-cosine schedule."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i + 1, cfg))
    return opt, sched


def fingerprint(cfg: TrainConfig, mixer_type: str, method_params: dict, corpus, key: Optional[str] = None) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (JSON-normalised).

    ``key`` is the caller's hash of everything else the run depends on (the pipeline's unit key:
    code, data and weights-file versions), so no checkpoint made under another key is resumed.
    """
    fp = {f"train.{k}": v for k, v in cfg.model_dump().items() if k not in RUNTIME_KEYS}
    if key is not None:
        fp["unit.key"] = key
    fp["method.type"] = mixer_type
    fp["method.params"] = method_params
    fp["corpus.tokenizer_hash"] = corpus.tokenizer_hash
    fp["corpus.train_domains"] = corpus.train_domains
    return json.loads(json.dumps(fp, sort_keys=True, default=str))


def _resolve_dtype(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.dtype == "auto":
        return device.type == "cuda"
    return cfg.dtype == "bf16"


def _weights_str(domains: list[str], w: np.ndarray) -> str:
    return " ".join(f"{d[:6]}={x:.2f}" for d, x in zip(domains, w))


def train(
    cfg: TrainConfig,
    corpus,
    method: str,
    method_params: Optional[dict],
    out_dir: str | Path,
    tracker: Tracker = NullTracker(),
    resume: bool = False,
    mixer_ctx_extra: Optional[dict] = None,
    key: Optional[str] = None,
) -> dict[str, Any]:
    """Train one GPT-2 on one method's mixture; returns the summary (also written to summary.json).

    ``method`` is a mixer type (``uniform``) or a method label whose ``method_params`` carry ``type``.
    ``out_dir`` is locked (``<out_dir>/.lock``) while the run works in it; ``key`` goes into the
    checkpoints' fingerprint (see :func:`fingerprint`).
    """
    t_start = time.time()
    params = dict(method_params or {})
    mixer_type = str(params.pop("type", method))
    partition = params.pop("partition", None)  # {"name", "key", "dir"}: train on nodes (dograph_core.partition)
    out = Path(out_dir)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = init_distributed(device)
    created = info.is_main and not out.exists()
    try:
        with contextlib.ExitStack() as stack:
            if info.is_main:  # one writer per output directory; the ranks of one DDP run share it
                writable_dir(out)
                stack.enter_context(RunLock(out, hint="train into another --out directory", what="output directory"))
                for d in (out, out / "checkpoints"):  # what a kill mid-write left: .final.*.tmp, .step_N.pt.*.tmp
                    remove_leftovers(d)
            barrier(info)
            return _train(cfg, corpus, method, mixer_type, params, out, tracker, resume, mixer_ctx_extra, device, info,
                          t_start, key, partition)
    except BaseException:
        if created and out.is_dir() and {p.name for p in out.iterdir()} <= {".lock"}:  # failed before writing anything
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        cleanup(info)


def _train(cfg, corpus, method, mixer_type, params, out, tracker, resume, extra, device, info: DistInfo, t_start, key,
           partition=None):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bf16 = _resolve_dtype(cfg, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rank_slice(cfg.batch_size, 0, info.world_size, 0, cfg.grad_accum)  # fails early if not divisible
    sources = corpus  # the evaluation is over the sources, whatever the mixture is over
    if partition:
        corpus = open_partition(partition, corpus, cfg.seq_len)
    domains = corpus.train_domains
    ckpt_dir = out / "checkpoints"
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None and not resume:
        raise TrainError(f"{out} already holds checkpoints ({latest.name}); resume it, or train into a new directory")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.scale, corpus.vocab_size, cfg.seq_len, corpus.eot_id).to(device)
    n_params = count_params(model)
    ctx = MixerContext(
        domains=domains, natural=corpus.natural_weights, total_steps=cfg.steps, seq_len=cfg.seq_len,
        vocab_size=corpus.vocab_size, device=device, seed=cfg.seed, corpus=corpus,
        heldout_domains=corpus.heldout_domains, out_dir=out / "mixer", scale=cfg.scale,
        rank=info.rank, world_size=info.world_size, bf16=bf16,
    )
    for k, v in (extra or {}).items():
        setattr(ctx, k, v)
    mixer = build_mixer(mixer_type, params, ctx)
    sampler = MixtureSampler(
        {d: corpus.tokens("train", d) for d in domains}, domains, cfg.seq_len, cfg.batch_size,
        mixer.sampling_weights(), seed=cfg.seed if cfg.data_seed is None else cfg.data_seed, max_epochs=cfg.max_epochs,
        stratified=getattr(mixer, "stratified_batches", False),  # DoReMi's batch: stratified
    )
    opt, sched = make_optimizer(model, cfg, device)
    fp = fingerprint(cfg, mixer_type, {**params, **({"partition": partition["key"]} if partition else {})}, corpus, key)

    start = 0
    if resume and latest is not None:
        ck, latest = load_latest(ckpt_dir, fp)  # a corrupt newest checkpoint falls back to the one before
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        sampler.load_state_dict(ck["sampler"])
        mixer.load_state_dict(from_storable(ck["mixer"]))
        set_rng_state(ck["rng"])
        start = int(ck["step"])
        del ck

    ddp = None
    if info.enabled and mixer.apply != "grad":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd: torch.nn.Module = LMLoss(ddp if ddp is not None else model, bf16)
    if cfg.compile:
        fwd = torch.compile(fwd)
    reduce = make_reduce(info, device)

    log = MetricsLog(out / "metrics.jsonl", enabled=info.is_main, truncate_after=start)
    if info.is_main and start == 0:
        tracker.log_params({"method": method, "mixer": mixer_type, "params": n_params, **{f"train.{k}": v for k, v in cfg.model_dump().items()}})
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{method}/{cfg.scale}", dynamic_ncols=True, file=sys.stderr)

    model.train()
    last_ckpt: Optional[Path] = latest if start else None
    t_log, tok_log, train_time = time.time(), 0, 0.0
    loss_value = float("nan")
    clip = getattr(mixer, "total_grad_clip", None)  # a mixer may own the total clip (DoGE: its max_grad_norm)
    clip = cfg.grad_clip if clip is None else clip
    # the pre-clip gradient norm, summarised so that a spike between two logged steps is not lost
    gn_interval, gn_max, gn_max_step, clipped = 0.0, 0.0, 0, 0
    for step in range(start + 1, cfg.steps + 1):
        if STOP.is_set() and not info.enabled:  # (a DDP run is stopped by torchrun, rank by rank)
            if bar is not None:
                bar.close()
            if step - 1 > start:
                last_ckpt = _checkpoint(ckpt_dir, step - 1, model, opt, sched, sampler, mixer, fp, info)
            raise TrainInterrupted(f"{method}: stopped on request after step {step - 1} of {cfg.steps}; "
                                   f"{f'checkpoint {last_ckpt}' if last_ckpt else 'no checkpoint was written yet'}")
        t0 = time.time()
        lr = sched.get_last_lr()[0]
        draw = sampler.draw(step)
        loss_sum = torch.zeros((), device=device)
        obj_sum = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            sl = rank_slice(cfg.batch_size, info.rank, info.world_size, m, cfg.grad_accum)
            x = sampler.tokens(draw, sl).to(device, non_blocking=True)
            dom = torch.from_numpy(draw.domain_ids[sl]).to(device)
            sync = ddp.no_sync() if ddp is not None and m < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                r = micro_step(fwd, model, mixer, x, dom, step, lr, 1.0 / cfg.grad_accum)
            loss_sum += r.loss
            obj_sum += r.objective
        if mixer.apply == "grad" and info.enabled:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.copy_(reduce(p.grad) / info.world_size)
        loss_value = mean_scalar(float(loss_sum.item()) / cfg.grad_accum, info, device)
        objective = mean_scalar(float(obj_sum.item()) / cfg.grad_accum, info, device)
        if not (math.isfinite(loss_value) and math.isfinite(objective)):
            if bar is not None:
                bar.close()
            where = f"the newest checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise TrainError(
                f"loss became {loss_value if not math.isfinite(loss_value) else objective} at step {step} "
                f"(method {method}, lr {lr:.3g}); training stopped, {where}. The cause was not diagnosed: "
                "it can be the data, the mixer's weights, a learning rate too high for this scale "
                "(train.lr, train.warmup_steps) or bf16 range (train.dtype=fp32)"
            )
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)) if clip > 0 else None
        if grad_norm is not None:
            gn_interval = max(gn_interval, grad_norm)
            clipped += grad_norm > clip
            if grad_norm > gn_max:
                gn_max, gn_max_step = grad_norm, step
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        if step % mixer.update_every == 0:
            new = mixer.update(step, reduce)
            if new is not None:
                mixer.set_weights(new, step)
            sampler.set_weights(mixer.sampling_weights())
        tok_log += tokens_per_step

        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.time()
            tok_s = tok_log / max(now - t_log, 1e-9)
            t_log, tok_log = now, 0
            gn_log, gn_interval = gn_interval, 0.0
            if info.is_main:
                metrics = {"loss": loss_value, "lr": lr, "tokens_per_s": tok_s}
                if grad_norm is not None:
                    metrics["grad_norm"] = grad_norm
                    if cfg.log_every > 1:
                        metrics["grad_norm_max"] = gn_log  # over the steps since the last log
                if mixer.apply != "sample":
                    metrics["objective"] = objective
                metrics.update({f"weight/{d}": float(w) for d, w in zip(domains, mixer.weights)})
                metrics.update({f"mixer/{k}": float(v) for k, v in mixer.diagnostics().items()})
                tracker.log_metrics(metrics, step=step)
                log.write({"step": step, **metrics, "batch_crc": draw.crc()})
                if bar is not None:
                    bar.set_postfix_str(f"loss {loss_value:.3f} | {tok_s:,.0f} tok/s | {_weights_str(domains, mixer.weights)}", refresh=False)
        if bar is not None:
            bar.update(1)
        train_time += time.time() - t0  # steps, logging and mixer updates; not evaluation or checkpoints

        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            res = evaluate_split(model, sources, "val", sources.train_domains, sources.heldout_domains, cfg.seq_len, cfg.eval_windows, device, bf16, info)
            if info.is_main:
                em = split_metrics(res, "val")
                tracker.log_metrics(em, step=step)
                log.write({"step": step, "eval": em})
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step != cfg.steps:
            last_ckpt = _checkpoint(ckpt_dir, step, model, opt, sched, sampler, mixer, fp, info)

    if bar is not None:
        bar.close()
    # a mixer's analysis probes (DoGraph's Figure 1) are measurement, like the evaluation: not train time
    analysis_time = float(getattr(mixer, "analysis_time", 0.0))
    train_time -= analysis_time
    if start < cfg.steps or latest is None:
        last_ckpt = _checkpoint(ckpt_dir, cfg.steps, model, opt, sched, sampler, mixer, fp, info)
    final_eval = evaluate_final(model, sources, sources.train_domains, sources.heldout_domains, cfg.seq_len, cfg.eval_windows, device, bf16, info)
    param_checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    summary = {
        "method": method, "mixer": mixer_type, "scale": cfg.scale, "params": n_params,
        "steps": cfg.steps, "resumed_from_step": start, "tokens": cfg.steps * tokens_per_step,
        "wall_time_s": time.time() - t_start, "train_time_s": train_time, "analysis_time_s": analysis_time,
        "tokens_per_s": (cfg.steps - start) * tokens_per_step / max(train_time, 1e-9),
        "device": str(device), "dtype": "bf16" if bf16 else "fp32", "world_size": info.world_size,
        "final_loss": loss_value, **summarize_eval(final_eval),
        # pre-clip gradient norm over the steps this process trained (after resumed_from_step); None if none
        "grad_norm_max": gn_max if gn_max_step else None, "grad_norm_max_step": gn_max_step or None,
        "clipped_steps": int(clipped) if gn_max_step else None,
        "final_weights": dict(zip(domains, map(float, mixer.final_weights()))),
        "mixture": sampler.report(), "param_checksum": param_checksum, "rank": info.rank,
    }
    if info.is_main:
        tracker.log_metrics({k: v for k, v in summarize_eval(final_eval, flat=True).items()}, step=cfg.steps)
        write_json(out / "eval.json", final_eval)
        write_weights(out / "weights.json", mixer.result())
        save_final(model, corpus.tokenizer_dir, out / "final")
        write_json(out / "summary.json", summary)
        for name in ("summary.json", "eval.json", "weights.json"):
            tracker.log_artifact(out / name)
    barrier(info)
    return summary


def _checkpoint(ckpt_dir, step, model, opt, sched, sampler, mixer, fp, info: DistInfo) -> Path:
    path = ckpt_dir / f"step_{step:07d}.pt"
    if info.is_main:
        state = {
            "fingerprint": fp, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "sampler": sampler.state_dict(), "mixer": mixer.state_dict(),
            "rng": rng_state(),
        }
        path = save_checkpoint(ckpt_dir, step, state)
    barrier(info)
    return path


def main(argv: Optional[list[str]] = None, tracker: Tracker = NullTracker()) -> int:
    """``python -m dograph_core.train`` (also under ``torchrun``): train one method from params.yaml.

    ``tracker`` receives rank 0's metrics while it trains (a launcher that tracks passes one in)."""
    from dograph_core.config import load_params
    from dograph_core.data.corpus import TokenCorpus

    ap = argparse.ArgumentParser(prog="python -m dograph_core.train", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--method", default="uniform", help="a method defined under 'methods' in params.yaml, or a mixer type")
    ap.add_argument("--data", default=None, help="tokenized corpus directory (default: tokenize.out_dir)")
    ap.add_argument("--out", default=None, help="output directory (default: <pipeline.out_dir>/<method>_<scale>_s<seed>)")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    try:
        p = load_params(args.params, args.preset, args.overrides)
        corpus = TokenCorpus(args.data or p.tokenize.out_dir)
        mp = p.methods[args.method].model_dump() if args.method in p.methods else {"type": args.method}
        if isinstance(mp.get("partition"), str):  # a partition's name: compute it (or find it stored)
            from dograph_core.partition import resolve_partition

            mp["partition"], _ = resolve_partition(mp["partition"], p.partitions[mp["partition"]], corpus)
        out = args.out or f"{p.pipeline.out_dir}/{args.method}_{p.train.scale}_s{p.train.seed}"
        s = train(p.train, corpus, args.method, mp, out, tracker=tracker, resume=args.resume)
    except (ValueError, OSError, RuntimeError) as e:  # TrainError, OutputError, RunLockedError are RuntimeErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    if s.get("rank", 0) == 0:
        print(json.dumps({k: s[k] for k in ("method", "scale", "steps", "final_loss", "val_loss_mean", "val_loss_worst", "tokens_per_s") if k in s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
