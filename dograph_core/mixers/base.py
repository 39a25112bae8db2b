"""The mixer protocol: how every mixing method (DoGraph and the baselines) plugs into the training loop.

Weights are **probabilities over training sequences of fixed length** (``train.seq_len`` tokens),
indexed like ``MixerContext.domains``. They are not shares of documents or of bytes.

Life of a mixer inside :func:`dograph_core.train.train`::

    mixer = build_mixer(name, cfg, ctx)          # ctx: domains, natural weights, steps, corpus, ...
    weights = mixer.initial_weights()            # used by the sampler from step 0
    for step in 1..steps:
        for each micro-batch:
            batch = sampler.next_batch()         # sequences drawn from the *sampling* weights
            out = model(batch)                   # + hidden states if "hidden" in mixer.needs
            stats = BatchStats(...)              # what the mixer declared in `needs`
            w = mixer.example_weights(stats)     # apply == "loss": per-example loss weights (mean ~1)
            loss = mean(w * example_loss); backward   (apply == "grad": the loop forms per-domain
                                                        gradients g_k and steps on sum_k a_k g_k)
            mixer.observe(stats)                 # accumulate statistics
        optimizer step
        if step % mixer.update_every == 0:
            new = mixer.update(step, reduce)     # `reduce` all-reduces tensors across ranks (DDP)
            mixer.set_weights(new, step)         # validated; history records changes only
            sampler.set_weights(mixer.sampling_weights())

``apply`` says how weights act:

* ``"sample"``: the sampler draws each sequence's domain from the weights (uniform, natural,
  static, ODM, DoGraph over human domains);
* ``"loss"``: the sampler keeps ``sampling_weights()`` and the mixer re-weights per-example losses
  (DoReMi's proxy, DoGraph over model-perceived domains);
* ``"grad"``: the loop computes one gradient per domain present in the batch (``domain_grads``)
  and the update uses ``sum_k weights[k] * g_k`` (DoGE).

Every mixer's state goes into every checkpoint (``state_dict``/``load_state_dict``; it may hold
tensors, numpy arrays, numbers, strings, lists and dicts: checkpoints load with ``weights_only=True``), and
``result()`` gives the weights file that the ``static`` mixer reads (:func:`write_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dograph_core.io import read_json, write_json

Apply = Literal["sample", "loss", "grad"]
NEEDS = frozenset({"domain_losses", "example_losses", "token_losses", "hidden", "domain_grads"})
WEIGHTS_FORMAT = "dograph-weights/1"


class MixerError(ValueError):
    """Bad mixer configuration or input (weights, domains, files)."""


class MixerConfig(BaseModel):
    """Base of every mixer's own config; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    type: str = ""
    update_every: int = Field(1, gt=0, description="call update() every this many optimizer steps")


@dataclass
class MixerContext:
    """What a mixer knows about the run it is part of."""

    domains: list[str]
    natural: np.ndarray
    total_steps: int
    seq_len: int
    vocab_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    corpus: Any = None           # dograph_core.data.corpus.TokenCorpus, for mixers that read data
    heldout_domains: list[str] = field(default_factory=list)
    out_dir: Optional[Path] = None  # where the mixer may write plots and diagnostics
    scale: str = ""
    rank: int = 0
    world_size: int = 1
    bf16: bool = False            # training runs under bf16 autocast (a mixer's own probes follow it)


@dataclass
class BatchStats:
    """Statistics of one micro-batch on this rank, as declared in ``Mixer.needs``."""

    step: int                                  # the optimizer step being computed (1-based)
    domain_ids: torch.Tensor                   # [B] long, index into ctx.domains
    example_loss: torch.Tensor                 # [B] mean token NLL per sequence (detached)
    input_ids: torch.Tensor                    # [B, T+1] the sequences (inputs and targets)
    lr: float = 0.0
    token_loss: Optional[torch.Tensor] = None  # [B, T] per-token NLL, if "token_losses"
    hidden: Optional[torch.Tensor] = None      # [B, T, H] final hidden states (after ln_f), if "hidden"
    logits: Optional[torch.Tensor] = None      # [B, T, V] logits, if "hidden"
    domain_grads: Optional[torch.Tensor] = None  # [k, P] flattened per-domain gradients, if "domain_grads"
    domain_present: Optional[torch.Tensor] = None  # [k] bool, which domains had examples
    model: Optional[torch.nn.Module] = None


Reduce = Callable[[torch.Tensor], torch.Tensor]  # all-reduce (sum) across ranks; identity on one process


def identity_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def check_weights(w: Any, domains: list[str], what: str = "weights") -> np.ndarray:
    """Validate and normalise a weight vector over ``domains``; clear errors for bad input."""
    arr = np.asarray(w, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != len(domains):
        raise MixerError(f"{what}: expected {len(domains)} values for domains {domains}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise MixerError(f"{what}: contains NaN or infinity: {arr.tolist()}")
    if np.any(arr < 0):
        bad = [domains[i] for i in np.flatnonzero(arr < 0)]
        raise MixerError(f"{what}: negative weight for {bad}: {arr.tolist()}")
    with np.errstate(over="ignore"):
        s = arr.sum()
    if not np.isfinite(s):  # huge but finite weights: their sum overflows, their ratios do not
        arr = arr / arr.max()
        s = arr.sum()
    if s <= 0:
        raise MixerError(f"{what}: all weights are zero")
    return arr / s


class Mixer:
    """Base class. Subclasses set ``name``, ``apply``, ``needs`` and override the hooks they use."""

    name: ClassVar[str] = "base"
    apply: ClassVar[Apply] = "sample"
    needs: ClassVar[frozenset[str]] = frozenset()
    Config: ClassVar[type[MixerConfig]] = MixerConfig

    def __init__(self, cfg: MixerConfig, ctx: MixerContext):
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise MixerError(f"{self.name}: unknown statistics {sorted(unknown)}; known: {sorted(NEEDS)}")
        self.cfg = cfg
        self.ctx = ctx
        self.update_every = cfg.update_every
        self.weights = self.initial_weights()
        self.history: list[tuple[int, list[float]]] = [(0, self.weights.tolist())]

    # -- weights -------------------------------------------------------------------------------
    def initial_weights(self) -> np.ndarray:
        k = len(self.ctx.domains)
        return np.full(k, 1.0 / k)

    def sampling_weights(self) -> np.ndarray:
        """What the sampler draws from. For ``apply == "sample"`` these are the mixture weights."""
        return self.weights

    # -- hooks ---------------------------------------------------------------------------------
    def example_weights(self, stats: BatchStats) -> Optional[torch.Tensor]:
        """Per-example loss weights ([B], mean about 1) for ``apply == "loss"``; None = all ones."""
        return None

    def observe(self, stats: BatchStats) -> None:
        """Accumulate statistics from one micro-batch."""

    def update(self, step: int, reduce: Reduce = identity_reduce) -> np.ndarray:
        """Return new weights; called every ``update_every`` optimizer steps."""
        return self.weights

    def set_weights(self, w: np.ndarray, step: int) -> None:
        if w is self.weights:  # the loop hands back what update() returned: already set and recorded
            return
        self.weights = check_weights(w, self.ctx.domains, f"{self.name} weights at step {step}")
        if not self.history or self.history[-1][1] != self.weights.tolist():  # record changes only
            self.history.append((step, self.weights.tolist()))

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        self.history = [(int(s), list(w)) for s, w in state["history"]]

    def final_weights(self) -> np.ndarray:
        """The mixture this run recommends (offline methods: the time average)."""
        return self.weights

    def result(self) -> dict[str, Any]:
        """The weights file content (see :func:`write_weights`)."""
        return weights_document(self.name, self.ctx.domains, self.final_weights(), self.history, self.ctx.total_steps)

    def diagnostics(self) -> dict[str, float]:
        """Extra scalars to log at each update (per-domain scores, ...)."""
        return {}


def weights_document(
    method: str,
    domains: list[str],
    weights: np.ndarray,
    history: list[tuple[int, list[float]]],
    total_steps: int,
    meta: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The one weights-file format every method writes and the ``static`` mixer reads.

    ``schedule`` lists (fraction of the run, weights) pairs, so a schedule found in a short
    search can be replayed on a longer run.
    """
    w = check_weights(weights, domains, f"{method} final weights")
    return {
        "format": WEIGHTS_FORMAT,
        "method": method,
        "unit": "probability of a training sequence of fixed length",
        "domains": list(domains),
        "weights": [float(x) for x in w],
        "schedule": [
            {"step": int(s), "fraction": float(s) / max(total_steps, 1), "weights": [float(x) for x in ws]}
            for s, ws in history
        ],
        "meta": meta or {},
    }


def write_weights(path: str | Path, doc: dict[str, Any]) -> None:
    write_json(path, doc)


class _ScheduleEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    fraction: float = Field(ge=0.0, allow_inf_nan=False, description="when it starts, as a fraction of the run")
    weights: list[float]


class _WeightsFile(BaseModel):
    """The shape of a weights file (see :func:`weights_document`); the values are checked by check_weights."""

    model_config = ConfigDict(extra="allow")
    domains: list[str]
    weights: list[float]
    schedule: list[_ScheduleEntry] = Field(default_factory=list)


def read_weights(path: str | Path, domains: Optional[list[str]] = None) -> dict[str, Any]:
    """Read and check a weights file; reorders to ``domains`` when given.

    Every part is checked here, schedule entries included, so a bad file fails before training.
    """
    from dograph_core.config import describe_errors

    path = Path(path)
    if not path.exists():
        raise MixerError(f"weights file not found: {path}")
    try:
        doc = read_json(path)
    except OSError as e:  # a directory, no permission
        raise MixerError(f"{path}: cannot read the weights file ({e.strerror})") from None
    except ValueError as e:
        raise MixerError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != WEIGHTS_FORMAT:
        raise MixerError(f"{path}: not a dograph weights file (expected format {WEIGHTS_FORMAT!r})")
    try:
        shape = _WeightsFile.model_validate(doc)
    except ValidationError as err:
        raise MixerError(f"{path}: " + "; ".join(describe_errors(err))) from None
    file_domains = shape.domains
    check_weights(shape.weights, file_domains, f"{path}: weights")
    for i, entry in enumerate(shape.schedule):
        check_weights(entry.weights, file_domains, f"{path}: schedule[{i}] (fraction {entry.fraction:g}) weights")
    entries = zip(doc.get("schedule", []), shape.schedule)
    doc = dict(doc, weights=shape.weights, schedule=[dict(raw, weights=e.weights, fraction=e.fraction) for raw, e in entries])
    if domains is not None:
        if sorted(file_domains) != sorted(domains):
            raise MixerError(f"{path}: domains {file_domains} do not match the corpus domains {domains}")
        order = [file_domains.index(d) for d in domains]
        doc["weights"] = [doc["weights"][i] for i in order]
        doc["schedule"] = [dict(s, weights=[s["weights"][i] for i in order]) for s in doc.get("schedule", [])]
        doc["domains"] = list(domains)
    return doc
