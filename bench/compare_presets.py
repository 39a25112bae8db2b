"""Budgets of the method comparison (``bench/compare.py --preset NAME``).

A preset says which methods run at which scale, with how many seeds, for how many steps, and
how the training runs are set up (``train`` overrides applied over ``params.yaml``'s ``train``
section). Every scale of one preset gets the same token budget (``steps * batch_size * seq_len``)
so the comparison is at equal compute per model; the compute yardstick is uniform at twice that.

Why these numbers (``docs/results/README.md`` has the measurements):

* ``cpu``: the full comparison on the 2-core CPU machines. nano (2 layers, 128 wide) with every
  method, 3 seeds; micro (6 layers, 192 wide) with uniform, natural, the best nano baseline and
  both DoGraph modes. 250 steps x 16 x 128 = 512k tokens per run: under uniform weights the
  scarcest domain (tech_docs, 53k training tokens) is seen about 1.2 times, so it repeats.
  (Sized for a shared, loaded 2-core machine, where a nano run took ~1.7 s per step; the
  offline searches ran 300 steps.)
* ``long``: nano only, every method, 3 seeds, at 4x the ``cpu`` budget (1000 steps x 16 x 128 =
  2M tokens; tech_docs is seen about 5 times under uniform weights), with the offline searches
  at the same 1000 steps. 61 minutes on a quiet 2-core machine (2 runs at a time).
* ``quick``: a first look in minutes: nano, one seed, 120 steps.
* ``gpu``: one H200; GPT-2 small (124M shape) and medium (355M shape) at one equal budget, the
  offline methods' weights transferred from the nano search; ``deadline_s`` stops launching
  new runs so the whole preset fits in a few minutes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

ALL_METHODS = ["uniform", "natural", "doremi", "doge", "odm", "dograph_human", "dograph_model"]
DOGRAPH = ("dograph_human", "dograph_model")
OFFLINE = ("doremi", "doge")  # searched at the search scale, trained as static weights elsewhere
BEST = "@best"                # placeholder: the best nano baseline (by worst-domain loss)


@dataclass
class Preset:
    name: str
    scales: dict[str, list[str]]                     # scale -> methods (may contain BEST)
    seeds: dict[str, list[int]]                      # scale -> seeds
    steps: int                                       # optimizer steps of every main run
    train: dict[str, Any] = field(default_factory=dict)   # TrainConfig overrides
    search_scale: str = "nano"
    search_steps: Optional[int] = None               # default: steps
    yardstick_seeds: dict[str, list[int]] = field(default_factory=dict)  # uniform at 2x budget
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers: int = 2
    deadline_s: Optional[float] = None               # stop launching new runs after this
    scale_train: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-scale overrides (e.g. steps)
    search_train: Optional[dict[str, Any]] = None    # TrainConfig overrides of the search (default: train)
    cleanup: bool = False                            # delete checkpoints/ and final/ of finished runs (big models)
    best_from: Optional[str] = None                  # scale whose baselines pick @best (default: the first scale)

    def steps_for(self, scale: str) -> int:
        return int(self.scale_train.get(scale, {}).get("steps", self.steps))


# dtype auto: bf16 autocast on CUDA, fp32 on CPUs. bf16 pays only on CPUs with native bf16 (AVX-512
# BF16/AMX); on AVX2-only machines a bf16 matmul measured about 80x slower than fp32, so a CPU preset
# that forced bf16 ran for hours instead of minutes there.
_CPU_TRAIN = {
    "dtype": "auto", "threads": 1, "seq_len": 128, "batch_size": 16, "lr": 1e-3, "warmup_steps": 30,
    "eval_every": 50, "eval_windows": 48, "ckpt_every": 100, "progress": False, "log_every": 10,
}

PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu",
        scales={"nano": list(ALL_METHODS), "micro": ["uniform", *DOGRAPH, BEST, "natural"]},
        seeds={"nano": [0, 1, 2], "micro": [0, 1, 2]},
        steps=250,
        search_steps=300,
        train=dict(_CPU_TRAIN),
        yardstick_seeds={"nano": [0], "micro": [0]},
        workers=3,
    ),
    "long": Preset(
        name="long",
        scales={"nano": list(ALL_METHODS)},
        seeds={"nano": [0, 1, 2]},
        steps=1000,
        train={**_CPU_TRAIN, "eval_every": 200, "ckpt_every": 250},
        yardstick_seeds={"nano": [0]},
        workers=2,
    ),
    "quick": Preset(
        name="quick",
        scales={"nano": list(ALL_METHODS)},
        seeds={"nano": [0]},
        steps=120,
        train={**_CPU_TRAIN, "warmup_steps": 12, "eval_every": 40, "eval_windows": 16, "ckpt_every": 0},
        yardstick_seeds={"nano": [0]},
        workers=2,
    ),
    "gpu": Preset(
        name="gpu",
        scales={"small": ["uniform", "dograph_human", "natural", "dograph_model", "doremi", "odm", "doge"],
                "medium": ["uniform", "dograph_human", "dograph_model", "doremi"]},
        seeds={"small": [0], "medium": [0]},
        steps=200,
        train={"dtype": "bf16", "device": "auto", "seq_len": 256, "batch_size": 64, "lr": 6e-4,
               "warmup_steps": 20, "eval_every": 50, "eval_windows": 32, "ckpt_every": 0,
               "progress": False, "log_every": 10},
        search_steps=300,
        search_train={**_CPU_TRAIN, "threads": None, "device": "auto"},
        yardstick_seeds={"small": [0]},
        # no Pyomo on the GPU machine: the numpy mirror-ascent solver of the same problem
        method_overrides={"dograph_human": {"solver": "numpy"}, "dograph_model": {"solver": "numpy"}},
        workers=1,
        deadline_s=330,
        cleanup=True,
    ),
}

def tiny(preset: Preset) -> Preset:
    """The same plan on the smallest budget (``--dry-tiny``): nano everywhere, a few CPU steps.

    For checking a preset's logic (planning, transfer, tables) on a CPU in seconds.
    """
    scales = {"nano" if i == 0 else "micro": m for i, m in enumerate(preset.scales.values())}
    first = list(preset.seeds.values())
    seeds = {s: first[min(i, len(first) - 1)][:1] for i, s in enumerate(scales)}
    tr = {"dtype": "fp32", "device": "cpu", "threads": 1, "seq_len": 32, "batch_size": 4, "warmup_steps": 1,
          "eval_every": 3, "eval_windows": 2, "ckpt_every": 0, "progress": False, "log_every": 1}
    overrides = {m: dict(v) for m, v in preset.method_overrides.items()}
    for m in DOGRAPH:  # tiny runs: update and cluster within a few steps
        overrides.setdefault(m, {}).update({"update_every": 2, "recluster_every": 4, "probe_size": 16, "k": 2,
                                            "r1": 4, "r2": 4, "plots": False})
    overrides.setdefault("doge", {})
    return Preset(name=preset.name, scales=scales, seeds=seeds, steps=6, train=tr, search_steps=4, search_train=tr,
                  yardstick_seeds={"nano": [seeds["nano"][0]]}, method_overrides=overrides, workers=1,
                  deadline_s=preset.deadline_s, cleanup=preset.cleanup)
