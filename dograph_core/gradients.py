"""Per-example gradient features: the model's own view of each training sequence.

Two paths, projected the same way so that they can be compared:

* **cheap** (:func:`output_features`): the output layer's per-sequence gradient
  ``G = (1/T) sum_t b_t h_t^T`` with ``b_t = softmax(logits_t) - onehot(y_t)`` and ``h_t`` the final
  hidden state after ``ln_f``, sketched by a seeded Kronecker projection
  ``z = vec(R_b G R_h^T) = vec((1/T) sum_t (R_b b_t)(R_h h_t)^T)``. It needs the forward pass only
  (no backward); ``R_b b_t = R_b p_t - R_b[:, y_t]``. Batched and chunked over sequences.
* **block** (:func:`block_features`): the same trick for any linear layer (e.g. the last MLP's
  ``c_proj``) through a forward hook that captures the layer's input ``a_t`` and output ``o_t``;
  the output gradient ``g_t`` comes from ``autograd.grad`` of the summed per-sequence losses with
  respect to ``o`` (a partial backward through the layers above only; no parameter gradients).
  Sequences do not interact in GPT-2, so this gives every sequence's own gradient at once.
* **exact** (:func:`exact_features`): per-example gradients of a parameter subset with ``torch.func``
  (``vmap`` over ``grad`` of ``functional_call``), each 2-D parameter projected by the same Kronecker
  matrices. For small probes and for validating the cheap path.

The per-sequence loss is the mean token NLL, as in ``BatchStats.example_loss``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F


class FeatureError(ValueError):
    """Gradient features that cannot be used (NaN, all zero, wrong shape)."""


def kron_matrices(rows: int, cols: int, r1: int, r2: int, seed: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded Gaussian sketch matrices ``L [r1, rows]`` and ``R [r2, cols]`` (entries N(0, 1/r)).

    ``vec(L G R^T)`` is a Johnson-Lindenstrauss sketch of a ``rows x cols`` matrix ``G`` with
    ``E <vec(L A R^T), vec(L B R^T)> = <A, B>``. The same (shape, seed) always gives the same matrices.
    """
    if min(rows, cols, r1, r2) <= 0:
        raise FeatureError(f"projection sizes must be positive: rows={rows} cols={cols} r1={r1} r2={r2}")
    gen = torch.Generator().manual_seed(int(seed))
    left = torch.randn(r1, rows, generator=gen) / r1**0.5
    right = torch.randn(r2, cols, generator=gen) / r2**0.5
    return left.to(device), right.to(device)


def count_sketch(rows: int, r1: int, seed: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded CountSketch of a ``rows``-dimensional vector into ``r1`` buckets: ``(bucket [rows], sign [rows])``.

    ``S[bucket[v], v] = sign[v]`` and zero elsewhere, so ``S x`` costs one multiply-add per coordinate
    (``O(rows)``, against ``O(r1 rows)`` for a dense Gaussian ``L``). The signs are independent
    +-1, which makes ``E <S a, S b> = <a, b>`` for any hash; the variance is about that of a Gaussian
    sketch with the same ``r1`` (Charikar, Chen and Farach-Colton 2002).
    """
    if min(rows, r1) <= 0:
        raise FeatureError(f"projection sizes must be positive: rows={rows} r1={r1}")
    gen = torch.Generator().manual_seed(int(seed))
    bucket = torch.randint(0, r1, (rows,), generator=gen)
    sign = torch.randint(0, 2, (rows,), generator=gen).float() * 2 - 1
    return bucket.to(device), sign.to(device)


SKETCHES = ("dense", "count")


@dataclass
class Projection:
    """The Kronecker projection of the output layer: ``R_b [r1, V]`` and ``R_h [r2, H]``; ``d = r1 * r2``.

    ``sketch``: ``dense`` (Gaussian ``R_b``, the default) or ``count`` (``R_b`` a CountSketch in the
    vocabulary dimension, stored as ``bucket``/``sign``: ``O(V)`` per token instead of ``O(r1 V)``;
    ``R_h`` stays Gaussian). Both are unbiased for inner products of the sketched gradients.
    """

    vocab_size: int
    hidden_size: int
    r1: int = 32
    r2: int = 64
    seed: int = 0
    sketch: str = "dense"
    _on: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.sketch == "dense":
            self.R_b, self.R_h = kron_matrices(self.vocab_size, self.hidden_size, self.r1, self.r2, self.seed)
            self.bucket = self.sign = None
        elif self.sketch == "count":
            _, self.R_h = kron_matrices(1, self.hidden_size, 1, self.r2, self.seed)
            self.bucket, self.sign = count_sketch(self.vocab_size, self.r1, self.seed + 104729)
            self.R_b = None
        else:
            raise FeatureError(f"sketch must be one of {SKETCHES}, got {self.sketch!r}")

    @property
    def dim(self) -> int:
        return self.r1 * self.r2

    def left_matrix(self) -> torch.Tensor:
        """``R_b`` as a dense ``[r1, V]`` matrix (the CountSketch written out; for tests and exact comparisons)."""
        if self.R_b is not None:
            return self.R_b
        S = torch.zeros(self.r1, self.vocab_size, device=self.sign.device)
        S[self.bucket, torch.arange(self.vocab_size, device=self.sign.device)] = self.sign
        return S

    def to(self, device) -> "Projection":
        if self.R_b is not None:
            self.R_b = self.R_b.to(device)
        else:
            self.bucket, self.sign = self.bucket.to(device), self.sign.to(device)
        self.R_h = self.R_h.to(device)
        self._on.clear()
        return self

    def on(self, device: torch.device) -> dict[str, Optional[torch.Tensor]]:
        """The matrices :func:`output_features` multiplies by, on ``device``, copied there once and kept.

        A copy from host memory to a GPU waits for every kernel queued before it, so copying the
        projection at every micro-batch would stall training; here it happens once per device.
        ``left_T [V, r1]`` is ``R_b^T``; for the CountSketch it is ``S^T`` written out on a GPU (one
        matrix product beats a scatter over ``V`` there) and None on the CPU (``bucket``/``sign`` are used)."""
        key = str(device)
        if key not in self._on:
            dense_left = self.R_b is not None or torch.device(device).type != "cpu"
            self._on[key] = {
                "left_T": self.left_matrix().to(device).T.contiguous() if dense_left else None,
                "R_h": self.R_h.to(device),
                "bucket": None if self.bucket is None else self.bucket.to(device),
                "sign": None if self.sign is None else self.sign.to(device),
            }
        return self._on[key]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without stalling a GPU: a copy from pageable host memory waits for the kernels
    queued before it; one from pinned memory, made non-blocking, does not."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def feature_macs(proj: "Projection") -> dict[str, int]:
    """Multiply-adds per token of :func:`output_features` under ``proj``, by part (the softmax, about
    ``V`` exponentials per token, is the same for every sketch and not counted)."""
    left = proj.vocab_size * (proj.r1 if proj.sketch == "dense" else 1)
    return {"left": left, "right": proj.hidden_size * proj.r2, "outer": proj.r1 * proj.r2,
            "total": left + proj.hidden_size * proj.r2 + proj.r1 * proj.r2}


def _check_shapes(hidden: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, proj: Projection) -> None:
    if hidden.ndim != 3 or logits.ndim != 3 or targets.ndim != 2:
        raise FeatureError(
            f"expected hidden [B,T,H], logits [B,T,V], targets [B,T]; got {tuple(hidden.shape)}, "
            f"{tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    B, T, H = hidden.shape
    if logits.shape[:2] != (B, T) or targets.shape != (B, T):
        raise FeatureError(f"batch/time mismatch: hidden {tuple(hidden.shape)}, logits {tuple(logits.shape)}, targets {tuple(targets.shape)}")
    if H != proj.hidden_size or logits.shape[2] != proj.vocab_size:
        raise FeatureError(
            f"projection built for H={proj.hidden_size}, V={proj.vocab_size} but got H={H}, V={logits.shape[2]}"
        )


@torch.no_grad()
def output_features(
    hidden: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    proj: Projection | list[Projection],
    chunk: int = 16,
    tokens: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Cheap forward-only sketch of each sequence's output-layer gradient: ``[B, r1*r2]`` float32.

    ``proj`` may be a list of projections (e.g. the stability check's second seed): the softmax,
    the costly part, is then computed once and one ``[B, d]`` tensor per projection is returned.
    ``tokens``: if given, use a random subset of that many positions per sequence (an unbiased,
    noisier estimate at a fraction of the cost); None uses every position.
    """
    projs = proj if isinstance(proj, list) else [proj]
    for p_ in projs:
        _check_shapes(hidden, logits, targets, p_)
    B, T, _ = hidden.shape
    mats = [p_.on(logits.device) for p_ in projs]
    lefts = [m["left_T"] for m in mats if m["left_T"] is not None]
    R_bT = (lefts[0] if len(lefts) == 1 else torch.cat(lefts, dim=1)) if lefts else None  # [V, n r1]
    R_h = mats[0]["R_h"] if len(mats) == 1 else torch.cat([m["R_h"] for m in mats])       # [n r2, H]
    if tokens is not None and tokens < T:
        idx = to_device(torch.randperm(T, generator=generator)[:tokens].sort().values, hidden.device)
        hidden, logits, targets = hidden[:, idx], logits[:, idx], targets[:, idx]
        T = tokens
    outs = [torch.empty(B, p_.dim, dtype=torch.float32, device=hidden.device) for p_ in projs]
    for s in range(0, B, chunk):
        e = min(B, s + chunk)
        probs = torch.softmax(logits[s:e].float(), dim=-1)
        if R_bT is not None:  # every left side written out as a matrix, in one matmul
            pd = probs @ R_bT                                       # [b, T, n r1]
            pd -= R_bT[targets[s:e]]                                # minus R_b[:, y_t]
        hh = hidden[s:e].float() @ R_h.T                            # [b, T, n r2]
        o1 = o2 = 0
        for out, p_, m in zip(outs, projs, mats):
            if m["left_T"] is not None:
                pb, o1 = pd[..., o1: o1 + p_.r1], o1 + p_.r1
            else:
                pb = _left_count(probs, targets[s:e], p_.r1, m["bucket"], m["sign"])
            z = torch.einsum("btr,bts->brs", pb, hh[..., o2: o2 + p_.r2])
            out[s:e] = z.reshape(e - s, -1) / T
            o2 += p_.r2
    return outs if isinstance(proj, list) else outs[0]


def _left_count(probs: torch.Tensor, targets: torch.Tensor, r1: int, bucket: torch.Tensor,
                sign: torch.Tensor) -> torch.Tensor:
    """``S b_t`` for every position: ``probs [b, T, V]`` summed into ``r1`` signed buckets, minus ``S e_y``."""
    out = torch.zeros(*probs.shape[:-1], r1, dtype=probs.dtype, device=probs.device)
    out.index_add_(-1, bucket, probs * sign)
    out.scatter_add_(-1, bucket[targets].unsqueeze(-1), -sign[targets].unsqueeze(-1))
    return out


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token NLL per sequence ``[B]`` (the loss whose gradient the features sketch)."""
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T), reduction="none").view(B, T).mean(1)


def resolve_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``model`` submodule by dotted name; negative integers index from the end (``transformer.h.-1.mlp.c_proj``)."""
    mod = model
    for part in name.split("."):
        try:
            mod = mod[int(part)] if part.lstrip("-").isdigit() else getattr(mod, part)
        except (AttributeError, IndexError, TypeError):
            raise FeatureError(f"module {name!r}: no part {part!r} in {type(mod).__name__}") from None
    return mod


def linear_weight_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    w = getattr(module, "weight", None)
    if w is not None and w.ndim == 2 and hasattr(module, "nf"):  # transformers Conv1D: weight [in, out]
        return int(w.shape[0]), int(w.shape[1])
    raise FeatureError(f"{type(module).__name__} is not a linear layer (nn.Linear or Conv1D)")


@contextmanager
def _capture(module: torch.nn.Module) -> Iterator[dict]:
    store: dict = {}

    def hook(_m, inputs, output):
        store["a"] = inputs[0].detach()
        store["o"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def probe_features(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    projs: list[Projection],
    block: Optional[str] = None,
    block_r: tuple[int, int] = (32, 64),
    chunk: int = 16,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Features of a probe batch ``input_ids [N, T+1]`` under several projections of the output layer.

    Returns (one ``[N, d]`` tensor per projection, the per-sequence losses ``[N]``). With ``block``
    (a linear layer's dotted name) every projection ``i`` gets that layer's sketch appended, seeded
    ``projs[i].seed + 7919``, sized ``block_r``; this needs a partial backward per chunk.
    """
    was_training = model.training
    model.eval()
    outs: list[list[torch.Tensor]] = [[] for _ in projs]
    losses = []
    module = resolve_module(model, block) if block else None
    if module is not None:
        linear_weight_shape(module)  # refuse a layer the Kronecker trick does not apply to
    try:
        for s in range(0, input_ids.shape[0], chunk):
            ids = input_ids[s : s + chunk]
            x, y = ids[:, :-1], ids[:, 1:]
            if module is None:
                with torch.no_grad():
                    o = model(x, output_hidden_states=True)
                hidden, logits = o.hidden_states[-1], o.logits
                for i, z in enumerate(output_features(hidden, logits, y, list(projs), chunk=chunk)):
                    outs[i].append(z)
                losses.append(sequence_loss(logits, y).detach())
                continue
            with torch.enable_grad(), _capture(module) as st:
                o = model(x, output_hidden_states=True)
                loss = sequence_loss(o.logits, y)
                (g,) = torch.autograd.grad(loss.sum(), st["o"])
            hidden, logits = o.hidden_states[-1].detach(), o.logits.detach()
            zos = output_features(hidden, logits, y, list(projs), chunk=chunk)
            for i, (p, zo) in enumerate(zip(projs, zos)):
                zb = block_features(st["a"], g.detach(), block_r[0], block_r[1], p.seed + 7919)
                outs[i].append(torch.cat([zo, zb], dim=1))
            losses.append(loss.detach())
    finally:
        model.train(was_training)
    return [torch.cat(z) for z in outs], torch.cat(losses)


@torch.no_grad()
def block_features(a: torch.Tensor, g: torch.Tensor, r1: int, r2: int, seed: int) -> torch.Tensor:
    """Kronecker sketch of a linear layer's per-sequence weight gradient ``sum_t a_t g_t^T`` ([in, out]).

    ``a [B,T,in]`` are the layer inputs, ``g [B,T,out]`` the loss gradients at its outputs.
    Matches :func:`exact_features` on that layer's weight (same matrices for the same seed).
    """
    L, R = kron_matrices(a.shape[-1], g.shape[-1], r1, r2, seed, device=a.device)
    za = a.float() @ L.T
    zg = g.float() @ R.T
    return torch.einsum("btr,bts->brs", za, zg).reshape(a.shape[0], -1)


def exact_features(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    params: dict[str, tuple[int, int, int]],
    project: bool = True,
    method: str = "vmap",
) -> torch.Tensor:
    """Exact per-example gradients of the named parameters, each Kronecker-projected, concatenated.

    ``params`` maps a parameter name to ``(r1, r2, seed)``. For ``lm_head.weight`` ([V, H]) with
    ``(proj.r1, proj.r2, proj.seed)`` this equals :func:`output_features` up to rounding, because
    the same seeded matrices are used. Tied weights are *not* tied here (``lm_head.weight`` gets its
    output-side gradient only). ``project=False`` returns the raw flattened gradients (tiny models).
    ``method``: ``"vmap"`` (torch.func) or ``"loop"`` (one autograd call per example).
    """
    return project_grads(per_example_grads(model, input_ids, list(params), method), params, project)


def per_example_grads(model: torch.nn.Module, input_ids: torch.Tensor, names: list[str],
                      method: str = "vmap") -> dict[str, torch.Tensor]:
    """``{name: [N, *shape]}``: each sequence's gradient of its mean token NLL (see :func:`exact_features`)."""
    from torch.func import functional_call, grad, vmap

    named = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in named]
    if missing:
        raise FeatureError(f"no parameters {missing} in {type(model).__name__}")
    sel = {n: named[n].detach() for n in names}

    def loss_fn(p, ids):
        ids = ids.unsqueeze(0)
        out = functional_call(model, p, (ids[:, :-1],), tie_weights=False, strict=False)
        return sequence_loss(out.logits, ids[:, 1:])[0]

    was_training = model.training
    model.eval()
    try:
        if method == "vmap":
            grads = vmap(grad(loss_fn), in_dims=(None, 0), randomness="same")(sel, input_ids)
        elif method == "loop":
            per = [grad(loss_fn)(sel, input_ids[i]) for i in range(input_ids.shape[0])]
            grads = {n: torch.stack([g[n] for g in per]) for n in sel}
        else:
            raise FeatureError(f"method must be 'vmap' or 'loop', got {method!r}")
    finally:
        model.train(was_training)
    return {n: g.detach().float() for n, g in grads.items()}


def project_grads(grads: dict[str, torch.Tensor], params: dict[str, tuple[int, int, int]],
                  project: bool = True) -> torch.Tensor:
    """Per-example gradients (from :func:`per_example_grads`) sketched per parameter as ``params`` says, concatenated."""
    blocks = []
    for n, (r1, r2, seed) in params.items():
        g = grads[n]
        if not project:
            blocks.append(g.reshape(g.shape[0], -1))
        elif g.ndim == 3:
            L, R = kron_matrices(g.shape[1], g.shape[2], r1, r2, seed, device=g.device)
            blocks.append(torch.einsum("ri,bij,sj->brs", L, g, R).reshape(g.shape[0], -1))
        else:
            gen = torch.Generator().manual_seed(int(seed))
            P = torch.randn(r1 * r2, g[0].numel(), generator=gen).to(g.device) / (r1 * r2) ** 0.5
            blocks.append(g.reshape(g.shape[0], -1) @ P.T)
    return torch.cat(blocks, dim=1)


def resolve_param_names(model: torch.nn.Module, names: list[str]) -> list[str]:
    """Full parameter names for dotted names that may index from the end (``transformer.h.-1.mlp.c_fc.weight``)."""
    full = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    out = []
    for name in names:
        path, _, attr = name.rpartition(".")
        mod = resolve_module(model, path) if path else model
        p = getattr(mod, attr, None)
        if not isinstance(p, torch.nn.Parameter):
            raise FeatureError(f"parameter {name!r}: {type(mod).__name__} has no parameter {attr!r}")
        prefix = full.get(id(mod), "")
        out.append(f"{prefix}.{attr}" if prefix else attr)
    return out


def check_features(z: torch.Tensor, what: str = "gradient features") -> torch.Tensor:
    """Refuse features that would give silently wrong clusters or weights."""
    if z.ndim != 2 or z.shape[0] == 0:
        raise FeatureError(f"{what}: expected a non-empty [N, d] matrix, got shape {tuple(z.shape)}")
    bad = ~torch.isfinite(z).all(dim=1)
    if bad.any():
        raise FeatureError(f"{what}: {int(bad.sum())} of {z.shape[0]} rows contain NaN or infinity "
                           "(diverged training or a bad batch); the previous weights are kept")
    if not (z.abs().sum(dim=1) > 0).any():
        raise FeatureError(f"{what}: all {z.shape[0]} rows are zero (no gradient signal)")
    return z


def center(z: torch.Tensor, mean: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract the feature mean (the shared direction that dominates early training); returns (z - mean, mean)."""
    mean = z.mean(dim=0) if mean is None else mean
    return z - mean, mean


def unit_normalize(z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm (gradient *directions*); zero rows stay zero."""
    return z / z.norm(dim=1, keepdim=True).clamp_min(eps)
