"""The DoGraph mixer's settings (``methods.<name>`` with ``type: dograph``); ``docs/method.md`` says why each default."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from dograph_core.mixers.base import MixerConfig


# what only DoGraph's own rule reads: with rule uniform or rnb, setting one of these is a mistake
DOGRAPH_ONLY = {"objective", "graph", "rho", "knn", "target", "tau_kl", "eps", "floor", "cap", "solver", "fallback",
                "shrink", "tau", "prior", "horizon", "min_windows", "trend"}


class DoGraphConfig(MixerConfig):
    update_every: int = Field(20, gt=0, description="T_w: rebuild the graph and re-solve every this many steps")
    nodes: Literal["human", "model"] = Field("human", description="graph nodes: the human sources or gradient clusters")
    k: int = Field(8, ge=2, description="number of model-perceived domains (nodes: model)")
    r1: int = Field(32, gt=0, description="rows of the output-residual projection R_b")
    r2: int = Field(64, gt=0, description="rows of the hidden-state projection R_h (d = r1 r2)")
    proj_seed: int = Field(0, description="projection seed (combined with the run seed); the check uses +1")
    # -- how the weights over the nodes are set
    rule: Literal["dograph", "uniform", "rnb"] = Field(
        "dograph", description="dograph: the progress target through the graph (F1/F2/A1); uniform: the nodes "
                               "alone, equal weights (a partition's own effect, e.g. the live clusters); rnb: "
                               "R&B's Balance step softmax(lam G q / ||G q||) on the nodes' mean gradients "
                               "of the last window (DoGraph's sketched features)")
    lam: float = Field(3.0, gt=0, description="rule rnb: the softmax's scale (R&B, Table 7: 3)")
    # -- the graph and the optimisation
    objective: Literal["F1", "F2", "A1"] = Field(
        "F1", description="F1: need-weighted proportional progress; F2: weighted max-min progress; "
                          "A1: MMD matching to an explicit target")
    graph: Literal["gram", "cosine", "off"] = Field(
        "gram", description="transfer matrix: Gram of node mean gradients with magnitudes (rows over their "
                            "diagonal), cosine (no magnitudes), or off (identity: the graph removed)")
    rho: Optional[float] = Field(None, gt=0, description="F3 constraint a^T L a <= (rho/K)^2 sum W+: neighbours' "
                                                         "weights differ by about rho/K at most (None = no constraint: "
                                                         "the default, see docs/method.md)")
    knn: Optional[int] = Field(None, gt=0, description="keep each node's k strongest edges (None = dense)")
    target: Optional[Union[str, dict[str, float]]] = Field(
        None, description="A1: the target, a domain (may be held out: then it is no longer held out for this "
                          "method) or a mixture {domain: weight}")
    tau_kl: float = Field(0.3, ge=0, description="F1/F2: KL(a || beta) weight, the price of moving the weights away "
                                                 "from the progress target (A1: KL(a || a_prev))")
    eps: float = Field(1e-3, ge=0, lt=1, description="final smoothing (1 - eps) a + eps / K")
    floor: Optional[float] = Field(None, ge=0, le=1, description="lower bound of every node weight (None = 0.1 / K: "
                                                                 "no node is starved)")
    cap: float = Field(1.0, gt=0, le=1, description="upper bound of every node weight")
    solver: Literal["auto", "ripopt", "highs", "numpy"] = "auto"
    fallback: Literal["numpy", "keep"] = Field("numpy", description="on a solver failure: the numpy reference "
                                                                     "solver, or keep the weights")
    # -- the progress signal
    ema: float = Field(0.8, ge=0, lt=1, description="EMA of node means and losses across update windows")
    min_node_samples: int = Field(4, ge=1, description="a node with fewer sequences in a window is not fresh: "
                                                       "no progress score, mean kept")
    horizon: int = Field(5, ge=2, description="updates over which each node's relative loss change is averaged")
    min_windows: int = Field(3, ge=2, description="changes needed before the noise can be estimated (beta is the prior before)")
    shrink: bool = Field(True, description="shrink the progress contrast towards the prior by its noise (James-Stein)")
    trend: Literal["slope", "mean_change"] = Field(
        "mean_change", description="a node's lag from loss levels (the training windows, the human nodes' probe): the mean "
                                   "of consecutive relative changes with se = sd / sqrt(n), which overstates the noise "
                                   "about horizon-fold (consecutive changes share a window), so the lag target acts in "
                                   "about 1 solve in 10; or the least-squares slope of the log loss over the last "
                                   "horizon + 1 updates, against a common curve, with its se from the residuals (the "
                                   "noise counted once: the target acts in about 6 in 10 and cost the mean loss at nano "
                                   "1x and 4x, docs/method.md section 4). The model nodes' probe always uses paired changes")
    tau: float = Field(1.0, gt=0, description="temperature of beta = prior * exp(u / tau) / Z")
    prior: Literal["base", "uniform"] = Field(
        "base", description="nodes: model: beta without a progress signal is the clusters' frequency under the base "
                            "sampler (no signal, no reweighting), or uniform over the clusters (human nodes: "
                            "always uniform)")
    progress_from: Literal["auto", "batch", "probe"] = Field(
        "auto", description="node losses from the training windows (batch) or a fixed probe set re-scored at each "
                            "update (probe: the same windows every time, so a change is the model's, not the "
                            "sample's); auto: probe for model nodes, batch for human nodes (with nodes: "
                            "model, the fallback human nodes always use batch)")
    progress_probe: int = Field(96, gt=0, description="sequences in the fixed progress probe (stratified over sources)")
    # -- model-perceived domains
    recluster_every: int = Field(100, gt=0, description="T_c: full re-clustering of a probe every this many steps")
    probe_size: int = Field(256, gt=0, description="sequences in each clustering probe, stratified over sources")
    probe_batch: int = Field(32, gt=0, description="probe sequences per forward pass")
    recluster_from: Literal["probe", "online"] = Field(
        "probe", description="rows of a re-clustering: a fresh probe of probe_size sequences stratified over sources "
                             "(one forward pass each), or, from the second on, per source the newest of its training "
                             "sequences featurised in the last recluster_every steps (the check projection computed "
                             "online too), with probe sequences only for the sources short of rows")
    min_ari: float = Field(0.2, ge=-1, le=1, description="model nodes are in force only while the last re-clustering's "
                                                        "ARI across two projection seeds is at least this")
    live: bool = Field(True, description="clusters follow the model between re-clusterings (online k-means, "
                                         "running centring); False = frozen at the last re-clustering")
    cluster_lr: float = Field(0.3, gt=0, le=1, description="online k-means step of the centroids and centring mean per window")
    balance: float = Field(0.1, ge=0, description="price step of the balanced assignment (0 = no occupancy guard)")
    max_price: float = Field(0.5, ge=0, description="bound of each cluster's price (cosine units)")
    balance_under: Literal["base", "sampler"] = Field(
        "base", description="the occupancy the guard balances: pi, the clusters' frequency under the base sampler (each "
                            "sequence counted base/sampling, averaged over windows, so cluster weights that draw a "
                            "cluster more do not raise its price), or each sampled window's own (the ablation: the "
                            "guard then pushes back on every weight away from 1/K)")
    balance_band: float = Field(2.0, ge=1, description="the guard moves a price only for occupancy beyond a factor "
                                                      "balance_band of 1/K (1 = towards 1/K always)")
    table_ema: Optional[float] = Field(
        0.8, ge=0, lt=1, description="decay per window of the cluster x source counts that turn cluster weights into "
                                     "source weights; each window's own assignments are added, so the map follows the "
                                     "live clusters (None = frozen at the last re-clustering's table, the ablation)")
    fallback_nodes: Literal["human", "uniform"] = Field(
        "human", description="while no recent clustering is stable: DoGraph over the human sources, or uniform")
    apply: Literal["loss", "sample"] = Field("sample", description="model nodes: sampling through the cluster x source "
                                                                    "table, or tempered loss weights")
    temper: float = Field(0.5, ge=0, le=1, description="loss weights (alpha/pi)^temper: pi^(1-g) alpha^g as the target")
    clip: tuple[float, float] = Field((0.5, 2.0), description="per-sequence loss weights are clipped to this range")
    pi_floor: float = Field(0.02, ge=0, lt=1, description="floor of the cluster frequency pi in alpha/pi")
    base: Literal["uniform", "natural"] = Field("uniform", description="sampling under loss weighting (nodes: model)")
    # -- features
    feature_tokens: Optional[int] = Field(None, gt=0, description="positions per sequence used by the online sketch (None = all)")
    feature_sequences: Optional[int] = Field(
        None, gt=0, description="sequences of each micro-batch whose online features are computed, a random subset "
                                "(None = all): the node statistics, the cluster counts and the online k-means see "
                                "that subset, each sequence's feature exact; not with nodes: model and apply: loss, "
                                "where every sequence needs its weight")
    sketch: Literal["dense", "count"] = Field(
        "dense", description="left side of the output-layer sketch: dense Gaussian R_b (O(r1 V) per token) or a "
                             "CountSketch in the vocabulary dimension (O(V) per token); the softmax is the same")
    features: Literal["sketch", "exact"] = Field(
        "sketch", description="sketch: the forward-only output-layer sketch; exact: torch.func per-example gradients "
                              "of exact_params (online and on probes; an ablation, about one extra backward per step)")
    exact_params: list[str] = Field(
        default_factory=lambda: ["lm_head.weight", *(f"transformer.h.-1.{m}.weight" for m in
                                                     ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))],
        description="features: exact: the parameters whose per-example gradients are used (negative block indices count from the end)")
    exact_r: tuple[int, int] = Field((16, 32), description="features: exact: Kronecker sketch size of each parameter's gradient")
    analysis_probes: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                         description="fractions of the run at which probe features are saved "
                                                     "(0 = the model at initialisation)")
    plots: bool = Field(True, description="write the analysis PNGs at the end of the run")

    @model_validator(mode="after")
    def _check(self) -> "DoGraphConfig":
        if self.nodes == "model" and self.probe_size < self.k:
            raise ValueError(f"probe_size ({self.probe_size}) must be at least k ({self.k})")
        if self.feature_sequences is not None and self.nodes == "model" and self.apply == "loss":
            raise ValueError("feature_sequences needs apply: sample with nodes: model (loss weights need every "
                             "sequence's feature); drop it or set apply: sample")
        if self.recluster_from == "online" and (self.features != "sketch" or self.apply == "loss"):
            raise ValueError("recluster_from: online reuses the online sketch of sampled sequences: it needs "
                             "features: sketch and apply: sample")
        if self.clip[0] <= 0 or self.clip[0] > self.clip[1]:
            raise ValueError(f"clip must be (low, high) with 0 < low <= high, got {self.clip}")
        if self.features == "exact" and not self.exact_params:
            raise ValueError("features: exact needs at least one parameter in exact_params")
        if self.min_windows > self.horizon:
            raise ValueError(f"min_windows ({self.min_windows}) must be at most horizon ({self.horizon})")
        if self.objective == "A1" and self.target is None:
            raise ValueError("objective A1 needs a target: a domain name or a mixture {domain: weight}")
        if self.target is not None and self.objective != "A1":
            raise ValueError(f"target is used by objective A1 only (objective is {self.objective})")
        ignored = sorted(self.model_fields_set & ({"lam"} if self.rule == "dograph" else DOGRAPH_ONLY))
        if ignored:
            what = "apply to rule rnb only" if self.rule == "dograph" else "apply to rule dograph only"
            raise ValueError(f"rule {self.rule} does not use {ignored}: they {what}; drop them")
        if self.objective == "A1" and self.nodes == "model":
            raise ValueError("objective A1 matches the mixture of source means: use nodes: human")
        return self
