"""Two processes with gloo through torchrun: disjoint data, identical weights, same stream as one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from _engine_fixture import make_corpus

ROOT = Path(__file__).resolve().parent.parent

# Runs `python -m dograph_core.train`'s main() on each rank, recording which windows each rank read.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import dograph_core.sampling as sampling
    import dograph_core.train as engine

    rank = int(os.environ["RANK"])
    read = []
    real_tokens = sampling.MixtureSampler.tokens

    def tokens(self, draw, idx=None):
        read.extend(zip(draw.domain_ids[idx].tolist(), draw.starts[idx].tolist()))
        return real_tokens(self, draw, idx)

    sampling.MixtureSampler.tokens = tokens
    real_train = engine.train

    def train(*a, **k):
        s = real_train(*a, **k)
        out = k.get("out_dir") or a[4]
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"summary": s, "read": read}, f)
        return s

    engine.train = train
    sys.exit(engine.main(sys.argv[1:]))
    """
)

TRAIN = dict(scale="nano", steps=4, batch_size=8, grad_accum=2, seq_len=32, warmup_steps=1, eval_every=2,
             eval_windows=4, ckpt_every=0, threads=1, progress=False, seed=0)


@pytest.mark.slow
def test_two_process_gloo_run_reads_disjoint_data_and_keeps_weights_identical(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": TRAIN, "methods": {"nat": {"type": "natural"}}, "pipeline": {"methods": ["nat"]}}))
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--params", str(params), "--method", "nat", "--data", str(corpus), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    # disjoint slices of the same global batches: together they are every sequence, once
    assert not set(map(tuple, r0["read"])) & set(map(tuple, r1["read"]))
    assert len(r0["read"]) == len(r1["read"]) == TRAIN["steps"] * TRAIN["batch_size"] // 2
    assert r0["summary"]["param_checksum"] == r1["summary"]["param_checksum"]
    assert r0["summary"]["val_loss_mean"] == r1["summary"]["val_loss_mean"]
    assert r0["summary"]["world_size"] == 2 and (out / "final" / "model.safetensors").exists()
    assert json.loads(proc.stdout.strip().splitlines()[-1])["method"] == "nat"

    # One process reads the same global stream: the same batches and (up to rounding) the same losses.
    from dograph_core.config import TrainConfig
    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.train import train

    one = tmp_path / "one"
    train(TrainConfig(**TRAIN), TokenCorpus(corpus), "nat", {"type": "natural"}, one)

    def steps(p):
        return [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]

    a, b = steps(out), steps(one)
    assert [r["batch_crc"] for r in a] == [r["batch_crc"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-4)
