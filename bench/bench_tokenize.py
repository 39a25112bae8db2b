"""Tokenizer training time and encoding throughput on ~10 MB of Python standard library source.

Encoding is timed two ways in the same run: the stage's batch encoder (``tokenizers``
``encode_batch_fast``, Rust, parallel) and a baseline that calls the Hugging Face tokenizer once per
document from Python. Medians of ``--repeats`` runs. Then the whole tokenize stage (train + encode +
write shards) runs once on the same text laid out as a prepared corpus.

    .venv/bin/python bench/bench_tokenize.py [--mb 10] [--vocab 4096] [--repeats 3]

Ends with one line of JSON: {"bench": "tokenize", "ratio": batch / per-document throughput, ...}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dograph_core.config import TokenizeConfig  # noqa: E402
from dograph_core.data.tokenize import _encoder, tokenize  # noqa: E402
from dograph_core.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def stdlib_docs(mb: float) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        size += len(text.encode())
        if size >= mb * 1e6:
            break
    return docs


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    docs = stdlib_docs(args.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"{len(docs)} stdlib files, {mb:.1f} MB, vocab {args.vocab}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t_train = median_time(lambda: train_tokenizer(docs, args.vocab, 2, tmp / "tok"), args.repeats)
        tok = load_tokenizer(tmp / "tok")
        encode = _encoder(tok)
        n_tokens = sum(len(ids) for ids in encode(docs))
        t_batch = median_time(lambda: [encode(docs[i : i + 512]) for i in range(0, len(docs), 512)], args.repeats)
        t_single = median_time(lambda: [tok(d, add_special_tokens=False)["input_ids"] for d in docs], args.repeats)
        # the whole stage, on the same text split into three domains and three splits
        prepared = tmp / "prepared"
        names = ("a", "b", "c")
        for split in ("train", "val", "test"):
            (prepared / split).mkdir(parents=True)
        files = {(s, n): open(prepared / s / f"{n}.jsonl", "w") for s in ("train", "val", "test") for n in names}
        for i, d in enumerate(docs):
            split = "val" if i % 20 == 0 else "test" if i % 20 == 1 else "train"
            files[(split, names[i % 3])].write(json.dumps({"id": str(i), "domain": names[i % 3], "text": d}) + "\n")
        for f in files.values():
            f.close()
        (prepared / "manifest.json").write_text(json.dumps({"train_domains": list(names), "heldout_domains": []}))
        cfg = TokenizeConfig(out_dir=str(tmp / "out"), vocab_size=args.vocab)
        t = time.perf_counter()
        tokenize(prepared, cfg, progress=False)
        t_stage = time.perf_counter() - t
    batch_tps, single_tps = n_tokens / t_batch, n_tokens / t_single
    print(f"train tokenizer: {t_train:.2f} s ({mb / t_train:.1f} MB/s), median of {args.repeats}")
    print(f"encode, batch:   {batch_tps / 1e6:.2f} M tokens/s ({mb / t_batch:.1f} MB/s), {n_tokens:,} tokens")
    print(f"encode, per doc: {single_tps / 1e6:.2f} M tokens/s ({mb / t_single:.1f} MB/s)  [baseline]")
    print(f"whole tokenize stage (train + encode + shards): {t_stage:.2f} s")
    print(json.dumps({
        "bench": "tokenize", "ratio": round(batch_tps / single_tps, 2), "mb": round(mb, 1), "vocab": args.vocab,
        "train_s": round(t_train, 2), "encode_tokens_per_s": round(batch_tps), "baseline_tokens_per_s": round(single_tps),
        "stage_s": round(t_stage, 2),
    }))


if __name__ == "__main__":
    main()
