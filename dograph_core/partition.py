"""Partitions: what a domain is. Each training document is mapped to a node; the mixers see nodes.

A partition is computed once from a tokenized corpus and stored beside it (``partition.json``,
``assign.npz`` and, for the clustered kinds, ``centroids.npy``), so a reproduction has the
clustering itself, not just the weights learned over it. Kinds:

* ``human``: the source labels (a node is a source; the corpus as it is);
* ``text``: k-means on a text representation of each document, TF-IDF of its words reduced by a
  truncated SVD (scikit-learn; offline), or the mean embedding of a local sentence-embedding model
  directory (``text.model``);
* ``hidden``: k-means on the mean-pooled final hidden states of a model after a short uniform
  warm-up (``hidden.warmup_steps`` at ``hidden.scale``), or of a given model directory;
* ``gradient``: k-means of each document's output-layer gradient under the same warm-up model (or
  model directory), sketched as DoGraph sketches it (``dograph_core.gradients.output_features``),
  centred and unit-normalised: a static gradient partition, computed once (as DIDS does with a proxy
  model); DoGraph's ``nodes: model`` is the live one, re-clustered during training;
* ``file``: node labels read from a CSV or JSON-lines file with the columns ``split``,
  ``domain``, ``doc`` (the document's index in that shard) and ``node``; or (``file.column``) a
  label field carried with every document from the user's records (``prepare.<source>.label_fields``
  through prepare and tokenize, e.g. a topic classifier's output), each distinct value a node.

The unit is the document (the text between two end-of-text tokens): that is what a labeller or a
topic classifier sees, and it keeps documents whole inside a node. A node's training tokens are its
documents concatenated in corpus order, so the sampler, every mixer and every checkpoint work on
nodes exactly as on sources. Validation and test documents get nodes from the same clustering
(nearest centroid), for the mixers that read held-out data per domain (DoGE); the evaluation of a run
stays on the fixed human domains, so partitions are compared on the same yardstick.

:class:`NodeCorpus` is the view of a corpus through a partition that training reads.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from dograph_core.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FORMAT = "dograph-partition/1"
Kind = Literal["human", "text", "hidden", "gradient", "file"]


class PartitionError(ValueError):
    """A partition that cannot be computed or used; names the setting to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextSettings(_Strict):
    model: Optional[str] = Field(None, description="a local sentence-embedding model directory (sentence-transformers "
                                                   "or a Hugging Face encoder); default: TF-IDF + truncated SVD")
    max_features: StrictInt = Field(20000, gt=0, description="TF-IDF vocabulary size")
    min_df: StrictInt = Field(2, ge=1, description="a word counts if it occurs in at least this many documents")
    dim: StrictInt = Field(64, gt=1, description="dimensions kept by the truncated SVD")
    fit_docs: StrictInt = Field(20000, gt=0, description="documents sampled to fit the representation and k-means")


class HiddenSettings(_Strict):
    """The model of the ``hidden`` and ``gradient`` kinds (settings key ``hidden`` for both)."""

    model: Optional[str] = Field(None, description="a Hugging Face causal LM directory (e.g. a run's final/); "
                                                   "default: a uniform warm-up trained here")
    scale: str = Field("nano", description="scale of the warm-up model")
    warmup_steps: StrictInt = Field(100, gt=0, description="uniform training steps of the warm-up")
    seq_len: StrictInt = Field(128, gt=1, description="warm-up sequence length, and tokens read per document")
    batch_size: StrictInt = Field(16, gt=0)
    device: str = "auto"


class FileSettings(_Strict):
    path: Optional[str] = Field(None, description="CSV or JSON lines with split, domain, doc, node per document")
    column: Optional[str] = Field(None, description="or a label field carried with the corpus "
                                                    "(prepare.<source>.label_fields): its values are the nodes")


class PartitionConfig(_Strict):
    """One named partition (``partitions.<name>`` in params.yaml)."""

    kind: Kind = "human"
    k: Optional[StrictInt] = Field(None, ge=1, description="nodes (text, hidden; file: must match the file's labels)")
    seed: StrictInt = 0
    out_dir: str = Field("data/partitions", description="where computed partitions are stored")
    text: TextSettings = Field(default_factory=TextSettings)
    hidden: HiddenSettings = Field(default_factory=HiddenSettings)
    file: FileSettings = Field(default_factory=FileSettings)

    def settings(self) -> dict[str, Any]:
        """The settings that decide the nodes (not where they are stored)."""
        out: dict[str, Any] = {"kind": self.kind, "k": self.k, "seed": self.seed}
        if self.kind in ("text", "hidden"):
            out[self.kind] = getattr(self, self.kind).model_dump()
        if self.kind == "file":  # only what is set: a labels file's partition keeps the key it had before `column`
            out["file"] = self.file.model_dump(exclude_none=True)
        if self.kind == "gradient":
            out["hidden"] = self.hidden.model_dump()
        return out


# -- documents --------------------------------------------------------------------------------
def doc_bounds(tokens: np.ndarray, eot_id: int) -> np.ndarray:
    """Offsets ``[n + 1]`` of the documents of a shard; document ``i`` is ``tokens[b[i]:b[i+1]]`` with its end token."""
    n = int(tokens.shape[0])
    if n == 0:  # an empty shard has no document
        return np.zeros(1, dtype=np.int64)
    ends = np.flatnonzero(np.asarray(tokens) == eot_id) + 1
    if not ends.size or ends[-1] != n:
        ends = np.append(ends, n)  # a last document without its end token
    return np.concatenate([[0], ends]).astype(np.int64)


def _doc_index(corpus, domains: list[str]) -> dict[tuple[str, str], np.ndarray]:
    return {(s, d): doc_bounds(corpus.tokens(s, d), corpus.eot_id) for s in SPLITS for d in domains}


def node_names(k: int) -> list[str]:
    width = max(2, len(str(k - 1)))
    return [f"node{i:0{width}d}" for i in range(k)]


# -- the partition --------------------------------------------------------------------------
@dataclass
class Partition:
    """Node ids per document of every (split, training domain) shard, and how they were found."""

    name: str
    settings: dict[str, Any]
    nodes: list[str]
    assign: dict[tuple[str, str], np.ndarray]   # (split, domain) -> node id per document
    centroids: Optional[np.ndarray] = None
    quality: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    @property
    def kind(self) -> str:
        return str(self.settings["kind"])

    def save(self, path: str | Path) -> Path:
        """Write the partition directory atomically (all of it or nothing)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.mkdir()
            np.savez(tmp / "assign.npz", **{f"{s}/{d}": a.astype(np.int32) for (s, d), a in self.assign.items()})
            if self.centroids is not None:
                np.save(tmp / "centroids.npy", self.centroids)
            write_json(tmp / "partition.json", {
                "format": FORMAT, "name": self.name, "key": self.key, "settings": self.settings,
                "nodes": self.nodes, "quality": self.quality})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Partition":
        path = Path(path)
        try:
            meta = read_json(path / "partition.json")
            if meta.get("format") != FORMAT:
                raise PartitionError(f"{path}: not a {FORMAT} partition (format {meta.get('format')!r})")
            with np.load(path / "assign.npz") as z:
                assign = {tuple(k.split("/", 1)): z[k].astype(np.int64) for k in z.files}
        except (OSError, ValueError, KeyError) as e:
            if isinstance(e, PartitionError):
                raise
            raise PartitionError(f"{path}: cannot read the partition ({e}); compute it again (`dograph partition`)") from None
        cpath = path / "centroids.npy"
        return cls(meta["name"], meta["settings"], list(meta["nodes"]), assign,
                   np.load(cpath) if cpath.exists() else None, meta.get("quality", {}), meta.get("key", ""))


def _fingerprint(path: Optional[str]) -> Optional[str]:
    """The content of a labels file, or the files of a model directory (names, sizes, modification times)."""
    if not path or not Path(path).exists():
        return None
    p = Path(path)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    files = sorted(f for f in p.rglob("*") if f.is_file())
    return hashlib.sha256(json.dumps([(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
                                      for f in files]).encode()).hexdigest()


def partition_key(cfg: PartitionConfig, corpus) -> str:
    """A hash of the settings, the corpus (its table and tokenizer) and what a path setting points at (a
    labels file's content, a model directory's files): a changed input is a new partition."""
    inputs = {"settings": cfg.settings(), "tokenizer": corpus.tokenizer_hash, "table": corpus.meta.get("table"),
              "format": FORMAT}
    paths = {"file": cfg.file.path if cfg.kind == "file" else None,
             "text_model": cfg.text.model if cfg.kind == "text" else None,
             "hidden_model": cfg.hidden.model if cfg.kind in ("hidden", "gradient") else None}
    inputs.update({k: _fingerprint(v) for k, v in paths.items() if v})  # only when set: other keys unchanged
    if cfg.kind == "file" and cfg.file.column:  # the carried labels: a relabelled corpus is a new partition
        files = sorted(Path(corpus.root).glob("*/*.labels.json"))
        inputs["labels"] = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    blob = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def partition_dir(name: str, cfg: PartitionConfig, corpus) -> Path:
    return Path(cfg.out_dir) / f"{name}-{partition_key(cfg, corpus)}"


def build_partition(name: str, cfg: PartitionConfig, corpus, work_dir: Optional[Path] = None,
                    progress: bool = False) -> Partition:
    """Compute partition ``name`` of ``corpus``; ``work_dir`` holds a warm-up model (``hidden``)."""
    where = f"partitions.{name}"
    domains = corpus.train_domains
    bounds = _doc_index(corpus, domains)
    n_train = sum(len(bounds["train", d]) - 1 for d in domains)
    if cfg.kind == "human":
        nodes = list(domains)
        assign = {(s, d): np.full(len(b) - 1, domains.index(d), dtype=np.int64) for (s, d), b in bounds.items()}
        centroids = None
    elif cfg.kind == "file":
        nodes, assign = _read_labels(cfg, where, bounds, corpus)
        centroids = None
    else:
        k = cfg.k or 8
        if k > n_train:
            raise PartitionError(f"{where}.k = {k} is larger than the {n_train} training documents of the corpus; lower k")
        if cfg.kind == "text":
            embed = _text_embedder(cfg, where, corpus)
        else:
            embed = _model_embedder(cfg, where, corpus, work_dir, progress)
        assign, centroids = _cluster(embed, bounds, k, cfg, where, corpus, progress)
        nodes = node_names(k)
    part = Partition(name, cfg.settings(), nodes, assign, centroids, key=partition_key(cfg, corpus))
    _check_nodes(part, where)
    part.quality = quality(part, corpus, bounds)
    return part


def _check_nodes(part: Partition, where: str) -> None:
    counts = np.zeros(len(part.nodes), dtype=np.int64)
    for (s, _), a in part.assign.items():
        if s == "train":
            counts += np.bincount(a, minlength=len(part.nodes))
    empty = [part.nodes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise PartitionError(f"{where}: nodes {empty} hold no training document; lower {where}.k "
                             f"(or give every node a document in {where}.file.path)")


def _read_labels(cfg: PartitionConfig, where: str, bounds: dict, corpus) -> tuple[list[str], dict]:
    path, column = cfg.file.path, cfg.file.column
    if path and column:
        raise PartitionError(f"{where}.file: give a labels file (path) or a label field (column), not both")
    if column:
        return _assign_labels(_column_labels(corpus, column, where, bounds), cfg, where, bounds, corpus.heldout_domains,
                              f"{where}.file.column = {column!r}", unknown_eval_ok=True)
    if not path:
        raise PartitionError(f"{where}.file.path: a file partition needs a labels file (CSV or JSON lines), "
                             f"or {where}.file.column: a label field carried with the corpus")
    p = Path(path)
    if not p.is_file():
        raise PartitionError(f"{where}.file.path = {path!r}: no such file")
    rows: list[dict] = []
    try:
        if p.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        else:
            with p.open(newline="") as f:
                rows = list(csv.DictReader(f))
    except (ValueError, UnicodeDecodeError) as e:
        raise PartitionError(f"{where}.file.path = {path!r}: cannot parse ({e})") from None
    labels: dict[tuple[str, str, int], str] = {}
    for i, r in enumerate(rows):
        try:
            labels[str(r["split"]), str(r["domain"]), int(r["doc"])] = str(r["node"])
        except (KeyError, ValueError, TypeError) as e:
            raise PartitionError(f"{where}.file.path = {path!r}: row {i + 1} needs split, domain, doc (an integer) "
                                 f"and node ({e!r})") from None
    return _assign_labels(labels, cfg, where, bounds, corpus.heldout_domains, f"{where}.file.path = {path!r}")


def _column_labels(corpus, column: str, where: str, bounds: dict) -> dict[tuple[str, str, int], str]:
    """The corpus's label field ``column`` per document, as node names (each value made file-safe)."""
    from dograph_core.data.corpus import CorpusError
    from dograph_core.data.text import file_safe

    labels: dict[tuple[str, str, int], str] = {}
    names: dict[str, str] = {}  # node name -> the value it came from
    for (s, d), b in bounds.items():
        try:
            values = corpus.labels(s, d, column)
        except CorpusError as e:
            raise PartitionError(f"{where}.file.column = {column!r}: {e}") from None
        if len(values) != len(b) - 1:
            raise PartitionError(f"{where}.file.column = {column!r}: {s}/{d} has {len(values)} labels for {len(b) - 1} "
                                 f"documents; re-run the tokenize stage")
        for j, v in enumerate(values):
            name = file_safe(v) or "_"
            if names.setdefault(name, v) != v:
                raise PartitionError(f"{where}.file.column = {column!r}: the labels {names[name]!r} and {v!r} would "
                                     f"both be node {name!r}; make them differ in a letter or digit")
            labels[s, d, j] = name
    return labels


def _assign_labels(labels: dict[tuple[str, str, int], str], cfg: PartitionConfig, where: str, bounds: dict,
                   heldout: list[str], source: str, unknown_eval_ok: bool = False) -> tuple[list[str], dict]:
    """Nodes and assignments from a node name per (split, domain, document index); every training document
    needs one. A validation or test document whose node has no training document is an error, or with
    ``unknown_eval_ok`` (labels carried with the data, where a rare value may miss the training split)
    left out of that split's nodes."""
    nodes = sorted({v for (s, _, _), v in labels.items() if s == "train"})
    bad = [v for v in nodes if not re.fullmatch(r"[A-Za-z0-9_.-]+", v) or v in heldout]
    if bad:
        raise PartitionError(f"{source}: node names {bad[:5]} must be letters, digits, '_', '.' "
                             f"or '-' and not a held-out source's name ({heldout})")
    if cfg.k is not None and len(nodes) != cfg.k:
        raise PartitionError(f"{where}.k = {cfg.k}, but {source} names {len(nodes)} nodes on training documents: "
                             f"{nodes[:10]}")
    ids = {v: i for i, v in enumerate(nodes)}
    assign, missing = {}, []
    for (s, d), b in bounds.items():
        a = np.full(len(b) - 1, -1, dtype=np.int64)
        for j in range(len(a)):
            v = labels.get((s, d, j))
            if v is None or v not in ids:
                if s == "train" or (v is not None and not unknown_eval_ok):
                    missing.append(f"{s}/{d}/{j}" + ("" if v is None else f" (node {v!r} has no training document)"))
                continue
            a[j] = ids[v]
        assign[s, d] = a
    if missing:
        raise PartitionError(f"{source} does not cover every training document: {len(missing)} "
                             f"missing, first {missing[:3]}")
    for (s, d), a in assign.items():  # held-out splits without a known node: nearest is unknown, so keep them out
        if (a < 0).any():
            log.warning("%s: %d %s documents of %s have no label of a training node and are left out of that "
                        "split's nodes", source, int((a < 0).sum()), s, d)
    return nodes, assign


# -- representations ---------------------------------------------------------------------------
Embedder = Callable[[list[np.ndarray], bool], np.ndarray]  # (documents' tokens, fit?) -> [n, dim]


def _decoder(corpus) -> Callable[[list[np.ndarray]], list[str]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(corpus.tokenizer_dir) / "tokenizer.json"))
    return lambda docs: tok.decode_batch([d.tolist() for d in docs], skip_special_tokens=True)


def _text_embedder(cfg: PartitionConfig, where: str, corpus) -> Embedder:
    decode = _decoder(corpus)
    if cfg.text.model:
        return _sentence_embedder(cfg.text.model, f"{where}.text.model", decode)
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    state: dict[str, Any] = {}

    def embed(docs: list[np.ndarray], fit: bool) -> np.ndarray:
        texts = decode(docs)
        if fit:
            vec = TfidfVectorizer(max_features=cfg.text.max_features, min_df=cfg.text.min_df, sublinear_tf=True)
            try:
                x = vec.fit_transform(texts)
            except ValueError as e:  # "empty vocabulary; perhaps the documents only contain stop words"
                raise PartitionError(f"{where}.text: no text representation can be computed ({e}); lower "
                                     f"{where}.text.min_df or check the corpus") from None
            dim = min(cfg.text.dim, x.shape[1] - 1, x.shape[0] - 1)
            if dim < 1:
                raise PartitionError(f"{where}.text: the TF-IDF vocabulary has {x.shape[1]} words over {x.shape[0]} "
                                     f"documents, too few for a representation; lower {where}.text.min_df")
            state["vec"] = vec
            state["svd"] = make_pipeline(TruncatedSVD(dim, random_state=cfg.seed), Normalizer(copy=False))
            return state["svd"].fit_transform(x)
        return state["svd"].transform(state["vec"].transform(texts))

    return embed


def _sentence_embedder(model_dir: str, where: str, decode) -> Embedder:
    if not Path(model_dir).is_dir():
        raise PartitionError(f"{where} = {model_dir!r}: not a local model directory")
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise PartitionError(f"{where} = {model_dir!r}: not a model directory with its tokenizer ({e})") from None
    if tok.pad_token is None:  # a decoder's tokenizer (GPT-2's) has none; padded positions are masked anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    limit = min(256, getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 256))

    @torch.no_grad()
    def embed(docs: list[np.ndarray], fit: bool) -> np.ndarray:
        out = []
        texts = decode(docs)
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], padding=True, truncation=True, max_length=limit, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).numpy())
        return _unit(np.concatenate(out))

    return embed


def _model_embedder(cfg: PartitionConfig, where: str, corpus, work_dir: Optional[Path], progress: bool) -> Embedder:
    """Mean-pooled final hidden states (``hidden``) or the sketched output-layer gradient (``gradient``)
    of each document's first ``hidden.seq_len`` tokens, centred by the fitted documents' mean."""
    import torch
    from transformers import GPT2LMHeadModel

    from dograph_core.distributed import resolve_device
    from dograph_core.gradients import Projection, output_features

    h = cfg.hidden
    device = resolve_device(h.device)
    if h.model:
        if not Path(h.model).is_dir():
            raise PartitionError(f"{where}.hidden.model = {h.model!r}: not a model directory")
        model = GPT2LMHeadModel.from_pretrained(h.model, local_files_only=True)
    else:
        model = warmup_model(cfg, corpus, work_dir, progress)
    model = model.to(device).eval()
    proj = Projection(model.config.vocab_size, model.config.n_embd, seed=cfg.seed, sketch="count")
    state: dict[str, Any] = {}

    @torch.no_grad()
    def features(ids: torch.Tensor) -> np.ndarray:  # ids [b, L] of documents of one length L
        grad = cfg.kind == "gradient"
        if grad and ids.shape[1] < 2:  # no next token: no gradient
            return np.zeros((ids.shape[0], proj.dim))
        inputs = ids[:, :-1] if grad else ids
        out = model(input_ids=inputs.to(device), output_hidden_states=True, use_cache=False)
        hs = out.hidden_states[-1]
        if not grad:
            return hs.float().mean(1).cpu().numpy()
        return output_features(hs, out.logits, ids[:, 1:].to(device), proj).cpu().numpy()

    def embed(docs: list[np.ndarray], fit: bool) -> np.ndarray:
        width = h.seq_len + (cfg.kind == "gradient")  # a gradient reads seq_len inputs and their targets
        part = [d[:width].astype(np.int64) for d in docs]
        rows: dict[int, list[int]] = {}
        for j, d in enumerate(part):
            rows.setdefault(max(len(d), 1), []).append(j)
        chunks: dict[int, np.ndarray] = {}
        for L, idx in rows.items():  # documents of equal length together: no padding to mask
            for s in range(0, len(idx), 64):
                sel = idx[s:s + 64]
                ids = torch.tensor(np.stack([np.resize(part[j], L) for j in sel]))
                chunks.update(zip(sel, features(ids)))
        z = np.stack([chunks[j] for j in range(len(part))])
        if fit:
            state["mean"] = z.mean(0)
        return _unit(z - state["mean"])

    return embed


def warmup_model(cfg: PartitionConfig, corpus, work_dir: Optional[Path], progress: bool):
    """A GPT-2 of ``hidden.scale`` trained ``hidden.warmup_steps`` steps on the uniform mixture over sources.

    Kept in ``work_dir/warmup-<key>/final`` (the key: the warm-up's settings and the corpus), so the
    ``hidden`` and ``gradient`` partitions of one corpus share one warm-up."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from dograph_core.config import TrainConfig
    from dograph_core.train import train

    h = cfg.hidden
    tcfg = TrainConfig(scale=h.scale, seq_len=h.seq_len, batch_size=h.batch_size, steps=h.warmup_steps,
                       warmup_steps=min(30, h.warmup_steps // 3), eval_every=0, eval_windows=4, seed=cfg.seed,
                       device=h.device, progress=progress)
    warm = cfg.model_copy(update={"kind": "hidden", "k": None, "hidden": h.model_copy(update={"device": "auto"})})
    out = Path(work_dir or cfg.out_dir) / f"warmup-{partition_key(warm, corpus)}"
    if not (out / "final").is_dir():
        import shutil

        shutil.rmtree(out, ignore_errors=True)  # a warm-up that did not finish: start it again
        train(tcfg, corpus, "uniform", {"type": "uniform"}, out)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one file: its "Loading weights" bar is noise
    try:
        return GPT2LMHeadModel.from_pretrained(out / "final", local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def _unit(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def _docs(corpus, bounds: dict, split: str, d: str) -> list[np.ndarray]:
    toks, b = corpus.tokens(split, d), bounds[split, d]
    return [np.asarray(toks[b[i]:b[i + 1]]) for i in range(len(b) - 1)]


def _cluster(embed: Embedder, bounds: dict, k: int, cfg: PartitionConfig, where: str, corpus,
             progress: bool) -> tuple[dict, np.ndarray]:
    from sklearn.cluster import KMeans

    domains = corpus.train_domains
    train_docs = {d: _docs(corpus, bounds, "train", d) for d in domains}
    every = [(d, j) for d in domains for j in range(len(train_docs[d]))]
    rng = np.random.default_rng(cfg.seed)
    n_fit = min(len(every), cfg.text.fit_docs if cfg.kind == "text" else len(every))
    pick = np.sort(rng.choice(len(every), size=n_fit, replace=False))
    z = embed([train_docs[every[i][0]][every[i][1]] for i in pick], True)
    if not np.all(np.isfinite(z)):
        raise PartitionError(f"{where}: the {cfg.kind} representation holds NaN or infinity")
    if len(np.unique(np.round(z, 6), axis=0)) < k:
        raise PartitionError(f"{where}: fewer than k = {k} distinct documents in the {cfg.kind} representation; lower k")
    km = KMeans(k, n_init=4, random_state=cfg.seed).fit(z)
    assign = {}
    for s in SPLITS:
        for d in domains:
            docs = train_docs[d] if s == "train" else _docs(corpus, bounds, s, d)
            assign[s, d] = km.predict(embed(docs, False)).astype(np.int64) if docs else np.zeros(0, np.int64)
            if progress:
                log.info("%s: assigned %d %s documents of %s", where, len(docs), s, d)
    return assign, km.cluster_centers_


# -- quality ------------------------------------------------------------------------------------
def node_tokens(assign: dict, bounds: dict, domains: list[str], split: str, k: int) -> np.ndarray:
    """Tokens of each source's ``split`` in each node, ``[k, len(domains)]`` (unlabelled documents left out)."""
    out = np.zeros((k, len(domains)))
    for j, d in enumerate(domains):
        a, sizes = assign[split, d], np.diff(bounds[split, d])
        out[:, j] = np.bincount(a[a >= 0], weights=sizes[a >= 0], minlength=k)
    return out


def quality(part: Partition, corpus, bounds: dict) -> dict[str, Any]:
    """How balanced the nodes are and how far they agree with the sources (training documents)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    domains = corpus.train_domains
    k = len(part.nodes)
    tokens = node_tokens(part.assign, bounds, domains, "train", k)
    labels_ = np.concatenate([part.assign["train", d] for d in domains])
    sources_ = np.concatenate([np.full(len(part.assign["train", d]), j) for j, d in enumerate(domains)])
    share = tokens.sum(1) / tokens.sum()
    nz = share[share > 0]
    return {
        "nodes": k,
        "documents": int(labels_.size),
        "token_share": dict(zip(part.nodes, map(float, share))),
        "balance": float(share.min() / share.max()),  # smallest node / largest node
        "entropy": float(-(nz * np.log(nz)).sum() / np.log(k)) if k > 1 else 1.0,
        "ari": float(adjusted_rand_score(sources_, labels_)),
        "nmi": float(normalized_mutual_info_score(sources_, labels_)),
        "tokens_by_source": {n: dict(zip(domains, map(int, tokens[i]))) for i, n in enumerate(part.nodes)},
    }


def quality_table(part: Partition) -> str:
    """A few lines: the partition's balance and its agreement with the sources."""
    q = part.quality
    top = ", ".join(f"{n} {s:.2f}" for n, s in q["token_share"].items())
    return (f"partition {part.name} ({part.kind}, {q['nodes']} nodes over {q['documents']} training documents): "
            f"balance {q['balance']:.2f}, entropy {q['entropy']:.2f}, ARI {q['ari']:.2f}, NMI {q['nmi']:.2f} "
            f"against the sources\n  token shares: {top}")


# -- the view training reads -------------------------------------------------------------------
class NodeCorpus:
    """A :class:`~dograph_core.data.corpus.TokenCorpus` seen through a partition: its training domains are nodes.

    ``tokens(split, node)`` is the node's documents concatenated in corpus order; held-out sources and
    the tokenizer are the corpus's own. ``base`` is the corpus, for the evaluation over sources.
    """

    def __init__(self, corpus, part: Partition, seq_len: Optional[int] = None):
        self.base = corpus
        self.partition = part
        self.meta = {**corpus.meta, "train_domains": list(part.nodes), "partition": part.name}
        missing = [f"{s}/{d}" for s in SPLITS for d in corpus.train_domains if (s, d) not in part.assign]
        if missing:
            raise PartitionError(f"partition {part.name} does not belong to this corpus: no nodes for {missing[:3]}; "
                                 f"compute it again (`dograph partition`)")
        self._maps: dict[tuple[str, str], np.ndarray] = {}
        self._bounds = _doc_index(corpus, corpus.train_domains)
        for d in corpus.train_domains:
            b = self._bounds["train", d]
            if len(b) - 1 != len(part.assign["train", d]):
                raise PartitionError(f"partition {part.name} has {len(part.assign['train', d])} training documents of "
                                     f"{d}, the corpus {len(b) - 1}: it was computed on other data; compute it again")
        if seq_len is not None:
            short = {n: int(self.tokens("train", n).shape[0]) for n in part.nodes}
            short = {n: t for n, t in short.items() if t < seq_len + 1}
            if short:
                raise PartitionError(f"partition {part.name}: nodes {short} hold fewer training tokens than one sequence "
                                     f"of train.seq_len + 1 = {seq_len + 1}; lower partitions.{part.name}.k")

    train_domains = property(lambda self: list(self.partition.nodes))
    heldout_domains = property(lambda self: self.base.heldout_domains)
    all_domains = property(lambda self: self.train_domains + self.heldout_domains)
    vocab_size = property(lambda self: self.base.vocab_size)
    eot_id = property(lambda self: self.base.eot_id)
    tokenizer_hash = property(lambda self: self.base.tokenizer_hash)
    tokenizer_dir = property(lambda self: self.base.tokenizer_dir)
    root = property(lambda self: self.base.root)

    def tokens(self, split: str, domain: str) -> np.ndarray:
        if domain in self.heldout_domains:
            return self.base.tokens(split, domain)
        if domain not in self.partition.nodes:
            raise PartitionError(f"unknown node {domain!r}; partition {self.partition.name} has {self.partition.nodes}")
        key = (split, domain)
        if key not in self._maps:
            node = self.partition.nodes.index(domain)
            pieces = []
            for d in self.base.train_domains:
                toks, b = self.base.tokens(split, d), self._bounds[split, d]
                for j in np.flatnonzero(self.partition.assign[split, d] == node):
                    pieces.append(np.asarray(toks[b[j]:b[j + 1]]))
            self._maps[key] = np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.base.tokens(split, self.base.train_domains[0]).dtype)
        return self._maps[key]

    def n_tokens(self, split: str, domain: str) -> int:
        return int(self.tokens(split, domain).shape[0])

    def source_shares(self, split: str) -> np.ndarray:
        """``[sources, nodes]``: the share of each source's ``split`` tokens that falls in each node (rows of a
        source with no labelled token are 0)."""
        t = node_tokens(self.partition.assign, self._bounds, self.base.train_domains, split,
                        len(self.partition.nodes)).T
        return t / np.maximum(t.sum(1, keepdims=True), 1e-300)

    @property
    def natural_weights(self) -> np.ndarray:
        sizes = np.array([self.n_tokens("train", n) for n in self.train_domains], dtype=np.float64)
        return sizes / sizes.sum()


def ensure_partition(name: str, cfg: PartitionConfig, corpus, progress: bool = False) -> Path:
    """The directory of partition ``name`` for ``corpus``: computed and stored unless it already is."""
    path = partition_dir(name, cfg, corpus)
    if (path / "partition.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = build_partition(name, cfg, corpus, work_dir=path.parent, progress=progress)
    part.save(path)
    return path


def resolve_partition(name: str, cfg: PartitionConfig, corpus, progress: bool = False) -> tuple[dict[str, str], Partition]:
    """Partition ``name`` computed (or found stored): ``({"name", "key", "dir"}, the partition)``; the dict is
    what training takes (:func:`open_partition`)."""
    path = ensure_partition(name, cfg, corpus, progress=progress)
    part = Partition.load(path)
    return {"name": name, "key": part.key, "dir": str(path.resolve())}, part


def open_partition(spec: Any, corpus, seq_len: Optional[int] = None):
    """The corpus as training sees it under partition ``spec`` (``{"name", "key", "dir"}``, as the pipeline passes it).

    The ``human`` partition is the corpus itself, so a run over sources reads exactly what it read before.
    """
    if not isinstance(spec, dict) or "dir" not in spec:
        raise PartitionError(f"partition {spec!r}: training takes a computed partition ({{'name', 'key', 'dir'}}); "
                             f"resolve a name with resolve_partition (the pipeline and the CLI do)")
    part = Partition.load(spec["dir"])
    if spec.get("key") and part.key != spec["key"]:
        raise PartitionError(f"{spec['dir']} holds partition key {part.key}, expected {spec['key']}; compute it again")
    if part.kind == "human" and part.nodes == corpus.train_domains:
        return corpus
    return NodeCorpus(corpus, part, seq_len)
