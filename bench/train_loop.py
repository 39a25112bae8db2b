"""Benchmark: the training engine against a bare PyTorch loop, per-step tracking cost, and peak memory.

* **Speed**: tokens/s of ``dograph_core.train.train`` (checkpoints and evaluation off, per-step
  logging on) against a bare loop over the same model (same seed), the same batches (drawn by the
  same sampler beforehand) and the same optimizer (AdamW groups, schedule, clipping). Steady state:
  the median step time after the first ``--warmup`` steps. Runs alternate, ``--reps`` times; medians are quoted.
  Target: engine >= 95% of the bare loop.
* **Tracking**: the same engine run with an MLflow tracker (SQLite store in a temporary directory)
  logging every step; the cost is the relative loss of tokens/s.
* **Memory**: peak resident memory of a short training run (a fresh process) on a synthetic corpus
  sized like the default one and on one ten times larger. Shards are memory-mapped, so the two should
  be within 10%.
* On a GPU (``--device cuda --scale small --dtype bf16``): tokens/s and model FLOPs utilisation
  (6N + 12 L d T FLOPs per token against ``--peak-tflops``, 989 for an H100/H200 in dense bf16).

Ends with one JSON line. Example: ``python bench/train_loop.py`` (CPU, mini scale).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dograph_core.config import TrainConfig  # noqa: E402
from dograph_core.data.corpus import TokenCorpus, write_corpus_json  # noqa: E402
from dograph_core.data.shards import write_shard  # noqa: E402
from dograph_core.microstep import LMLoss  # noqa: E402
from dograph_core.model import build_model, flops_per_token  # noqa: E402
from dograph_core.sampling import MixtureSampler  # noqa: E402
from dograph_core.tracking import NullTracker  # noqa: E402
from dograph_core.train import make_optimizer, train  # noqa: E402


def synth_corpus(root: Path, vocab: int, train_tokens: int, n_domains: int = 6, ratio: float = 20.0, seed: int = 0) -> Path:
    """Zipf-distributed random tokens in documents of about 1,000 tokens; domain sizes spanning ``ratio``."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab)
    p /= p.sum()
    sizes = np.geomspace(ratio, 1.0, n_domains)
    sizes = (sizes / sizes.sum() * train_tokens).astype(int)
    domains = [f"d{i}" for i in range(n_domains)]
    table = []
    eot = vocab - 1
    for d, n in zip(domains, sizes):
        row = {"domain": d, "heldout": False, "docs": {}, "tokens": {}}
        for split, m in (("train", n), ("val", max(n // 19, 5000)), ("test", max(n // 19, 5000))):
            toks = rng.choice(vocab - 1, size=m, p=p).astype(np.uint16)
            docs = (toks[i: i + 1000] for i in range(0, m, 1000))
            h = write_shard(root / split / f"{d}.bin", docs, eot, "synthetic")
            row["docs"][split], row["tokens"][split] = h.n_docs, h.n_tokens
        table.append(row)
    write_corpus_json(root, table, vocab_size=vocab, eot_id=eot, tokenizer_hash="synthetic")
    return root


CLOCK = time.perf_counter  # --clock cpu: this process's CPU time (robust when others share the machine)


class Timestamps(NullTracker):
    """Records when each step's metrics arrive (the end of the step); optionally forwards to another tracker."""

    def __init__(self, inner=None):
        self.t: dict[int, float] = {}
        self.inner = inner

    def log_metrics(self, metrics, step=None):
        if self.inner is not None:
            self.inner.log_metrics(metrics, step=step)
        if "loss" in metrics and step is not None:
            self.t[step] = CLOCK()


def steady_tok_s(t: dict[int, float], warmup: int, tokens_per_step: int) -> float:
    """Tokens per second from the median step time after ``warmup`` steps (robust to a busy machine)."""
    steps = sorted(t)
    dts = [t[k] - t[k - 1] for k in steps if k > warmup and k - 1 in t]
    return tokens_per_step / statistics.median(dts)


def engine_run(cfg: TrainConfig, corpus: TokenCorpus, out: Path, warmup: int, inner=None) -> float:
    tr = Timestamps(inner)
    train(cfg, corpus, "uniform", {}, out, tracker=tr)
    return steady_tok_s(tr.t, warmup, cfg.batch_size * cfg.seq_len)


class CutLogits(torch.nn.Module):
    """A model whose vocabulary is padded (a multiple of 64 suits the GPU's matrix tiles), with its logits
    cut back to the real vocabulary: under :class:`LMLoss` the padded rows get no probability and the loss
    means what it meant. Measured here as a lever (``--pad-vocab``), not an engine option."""

    def __init__(self, model: torch.nn.Module, vocab: int):
        super().__init__()
        self.model, self.vocab = model, vocab

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits = out.logits[..., : self.vocab]
        return out


def bare_run(cfg: TrainConfig, corpus: TokenCorpus, device: torch.device, bf16: bool, warmup: int,
             pad_vocab: int = 0) -> float:
    """The same model, batches and optimizer in the plainest loop (``pad_vocab``: the vocabulary rounded up
    to a multiple of it, the logits cut back before the loss)."""
    domains = corpus.train_domains
    s = MixtureSampler({d: corpus.tokens("train", d) for d in domains}, domains, cfg.seq_len, cfg.batch_size,
                       np.ones(len(domains)), seed=cfg.seed)
    batches = [s.tokens(s.draw(k)) for k in range(1, cfg.steps + 1)]
    torch.manual_seed(cfg.seed)
    vocab = corpus.vocab_size
    if pad_vocab:
        model = build_model(cfg.scale, -(-vocab // pad_vocab) * pad_vocab, cfg.seq_len, corpus.eot_id).to(device)
    else:
        model = build_model(cfg.scale, vocab, cfg.seq_len, corpus.eot_id).to(device)
    # the same fused forward + loss module the engine compiles
    fwd = LMLoss(CutLogits(model, vocab) if pad_vocab else model, bf16)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    opt, sched = make_optimizer(model, cfg, device)
    model.train()
    t = {}
    for k, x in enumerate(batches, 1):
        x = x.to(device, non_blocking=True)
        _, token_loss, _ = fwd(x)
        token_loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t[k] = CLOCK()
    return steady_tok_s(t, warmup, cfg.batch_size * cfg.seq_len)


def mlflow_tracker(tmp: Path):
    """A bare MLflow tracker (SQLite store) for the tracking-cost figure; None when MLflow is missing."""
    try:
        import mlflow
    except ImportError:
        return None
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    mlflow.set_experiment("bench")
    mlflow.start_run()

    class T(NullTracker):
        def log_metrics(self, metrics, step=None):
            mlflow.log_metrics(dict(metrics), step=step)

    return T()


RSS_SCRIPT = """
import resource, sys
from dograph_core.config import TrainConfig
from dograph_core.data.corpus import TokenCorpus
from dograph_core.train import train
cfg = TrainConfig(scale="nano", steps=int(sys.argv[3]), batch_size=16, seq_len=128, eval_every=0, eval_windows=8,
                  threads=1, progress=False, warmup_steps=1)
train(cfg, TokenCorpus(sys.argv[1]), "natural", {}, sys.argv[2])
# VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss_mb(corpus_dir: Path, out: Path, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(corpus_dir), str(out), str(steps)],
                       env=env, capture_output=True, text=True, check=True)
    return float(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", default="mini")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (dense bf16)")
    ap.add_argument("--default-tokens", type=int, default=4_000_000, help="training tokens of the 'default' corpus")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu = process CPU time (use with --threads 1 on a shared machine)")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--skip-tracking", action="store_true")
    ap.add_argument("--pad-vocab", type=int, default=0, metavar="M",
                    help="also time the bare loop with the vocabulary padded to a multiple of M (logits cut back)")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = args.dtype == "bf16"
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_loop_"))
    print(f"synthesising corpora in {tmp} ...", file=sys.stderr)
    small = synth_corpus(tmp / "corpus1x", args.vocab, args.default_tokens)
    corpus = TokenCorpus(small)
    cfg = TrainConfig(scale=args.scale, seq_len=args.seq_len, batch_size=args.batch, steps=args.steps, warmup_steps=2,
                      dtype=args.dtype, device=args.device, eval_every=0, eval_windows=1, ckpt_every=0,
                      threads=args.threads, progress=False, compile=args.compile, log_every=1)
    res: dict[str, list[float]] = {"bare": [], "engine": [], "engine_mlflow": [], "bare_padded": []}
    for rep in range(args.reps):
        res["bare"].append(bare_run(cfg, corpus, device, bf16, args.warmup))
        if args.pad_vocab:
            res["bare_padded"].append(bare_run(cfg, corpus, device, bf16, args.warmup, args.pad_vocab))
        res["engine"].append(engine_run(cfg, corpus, tmp / f"run{rep}", args.warmup))
        if not args.skip_tracking:
            tr = mlflow_tracker(tmp / f"ml{rep}") if rep == 0 or res["engine_mlflow"] else None
            if tr is not None:
                res["engine_mlflow"].append(engine_run(cfg, corpus, tmp / f"mlrun{rep}", args.warmup, tr))
                import mlflow

                mlflow.end_run()
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in res.items() if v), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in res.items() if v}
    out = {
        "bench": "train_loop", "device": args.device, "scale": args.scale, "dtype": args.dtype,
        "batch": f"{args.batch}x{args.seq_len}", "threads": torch.get_num_threads(), "reps": args.reps, "clock": args.clock,
        "bare_tok_s": round(med["bare"]), "engine_tok_s": round(med["engine"]),
        "ratio": round(med["engine"] / med["bare"], 4),
    }
    if "engine_mlflow" in med:
        out["engine_mlflow_tok_s"] = round(med["engine_mlflow"])
        out["mlflow_per_step_cost"] = round(1 - med["engine_mlflow"] / med["engine"], 4)
    if "bare_padded" in med:
        out["bare_padded_tok_s"] = round(med["bare_padded"])
        out["pad_vocab_speedup"] = round(med["bare_padded"] / med["bare"], 4)
    if device.type == "cuda":
        fpt = flops_per_token(args.scale, args.vocab, args.seq_len)
        out["mfu_engine"] = round(med["engine"] * fpt / (args.peak_tflops * 1e12), 4)
        out["mfu_bare"] = round(med["bare"] * fpt / (args.peak_tflops * 1e12), 4)
        out["gpu"] = torch.cuda.get_device_name()
    if not args.skip_rss:
        big = synth_corpus(tmp / "corpus10x", args.vocab, args.default_tokens * 10, seed=1)
        r1 = peak_rss_mb(small, tmp / "rss1", 20)
        r10 = peak_rss_mb(big, tmp / "rss10", 20)
        out.update({"rss_default_mb": round(r1, 1), "rss_10x_mb": round(r10, 1), "rss_ratio": round(r10 / r1, 4),
                    "corpus_tokens": [args.default_tokens, args.default_tokens * 10]})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
