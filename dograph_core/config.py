"""The one place where ``params.yaml`` is read into typed, validated objects.

Every section is a pydantic model that forbids unknown keys, so a typo fails with the
key, the value and what was expected. Presets (``configs/presets/<name>.yaml``) are
deep-merged over ``params.yaml`` before validation; ``overrides`` (``a.b.c=value``
strings, as on the CLI) are applied last.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"


class ConfigError(ValueError):
    """A bad configuration value: names the key, the value, and what was expected."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(Section):
    val: float = Field(0.05, ge=0.0, lt=0.5, description="fraction of documents in the validation split")
    test: float = Field(0.05, ge=0.0, lt=0.5, description="fraction of documents in the test split")


class LocalSourceConfig(Section):
    path: Optional[str] = Field(None, description="a directory of <domain>/*.txt, or a .jsonl/.parquet file or directory")
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    domain_field: str = "domain"


class HFSourceConfig(Section):
    name: Optional[str] = Field(None, description="a datasets name or path, e.g. cerebras/SlimPajama-627B")
    config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    domain_field: str = Field("meta.redpajama_set_name", description="dotted path to the domain label")
    streaming: bool = True
    max_docs: Optional[int] = Field(None, gt=0, description="stop after this many documents")
    data_files: Optional[list[str]] = Field(None, description="files for a packaged builder such as 'json' or 'parquet'")


class PrepareConfig(Section):
    source: Literal["default", "local", "hf"] = "default"
    out_dir: str = "data/prepared"
    cache_dir: str = "data/raw"
    total_mb: float = Field(12.0, gt=0, description="characters (MB) kept over all training domains, natural proportions")
    min_ratio: float = Field(20.0, ge=1.0, description="the largest training domain is at least this many times the smallest")
    domains: list[str] = Field(default_factory=list, description="subset of the source's domains (empty = all)")
    heldout: list[str] = Field(default_factory=lambda: ["email"], description="domains kept out of training")
    heldout_mb: float = Field(0.5, gt=0, description="characters (MB) kept of each held-out domain")
    doc_chars: int = Field(4000, gt=0, description="long texts are cut into documents of about this many characters")
    min_domain_chars: int = Field(2000, ge=0, description="a domain with less text than this (about one training sequence) is skipped")
    split: SplitConfig = Field(default_factory=SplitConfig)
    seed: int = 0
    local: LocalSourceConfig = Field(default_factory=LocalSourceConfig)
    hf: HFSourceConfig = Field(default_factory=HFSourceConfig)

    @field_validator("domains", "heldout")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({d for d in v if v.count(d) > 1})
        if dup:
            raise ValueError(f"duplicate domain names {dup}")
        return v


class TokenizeConfig(Section):
    out_dir: str = "data/tokenized"
    tokenizer: str = Field("train", description="'train' (byte-level BPE on the training split), 'gpt2', or a tokenizer directory")
    vocab_size: int = Field(4096, ge=260, le=2**20)
    min_frequency: int = Field(2, ge=1)
    min_tokens: int = Field(256, ge=1, description="a training domain needs at least this many training tokens (>= train.seq_len + 1)")


class TrainConfig(Section):
    scale: str = "nano"
    seq_len: int = Field(128, gt=1)
    batch_size: int = Field(16, gt=0, description="sequences per optimizer step (over all ranks and accumulation)")
    grad_accum: int = Field(1, gt=0)
    steps: int = Field(300, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)
    dtype: Literal["fp32", "bf16", "auto"] = Field("fp32", description="auto = bf16 on CUDA, fp32 on CPU")
    compile: bool = False
    device: str = "auto"
    threads: Optional[int] = Field(None, gt=0)
    eval_every: int = Field(100, ge=0)
    eval_windows: int = Field(32, gt=0, description="fixed validation windows per domain")
    ckpt_every: int = Field(0, ge=0, description="0 = only at the end")
    max_epochs: Optional[float] = Field(None, gt=0, description="cap on repetitions of any domain's data")
    seed: int = 0
    progress: bool = True
    log_every: int = Field(1, gt=0, description="log step metrics (tracker, metrics.jsonl) every this many steps")


class MethodConfig(Section):
    """One method of the comparison: a mixer type plus its parameters (validated by the mixer)."""

    model_config = ConfigDict(extra="allow")
    type: str


class PipelineConfig(Section):
    methods: list[str] = Field(
        default_factory=lambda: ["uniform", "natural", "doremi", "doge", "odm", "dograph_human", "dograph_model"]
    )
    proxy_scale: str = "nano"
    target_scales: list[str] = Field(default_factory=lambda: ["nano"])
    seeds: list[int] = Field(default_factory=lambda: [0])
    search_steps: Optional[int] = Field(None, gt=0, description="steps of the proxy search (default: train.steps)")
    max_parallel: int = Field(1, gt=0)
    task_runner: Literal["thread", "dask"] = "thread"
    dask_address: Optional[str] = Field(None, description="scheduler of an existing Dask cluster (default: a local cluster)")
    nproc_per_node: int = Field(1, gt=0, description="processes (GPUs) per training run; > 1 launches each run with torchrun")
    out_dir: str = "runs"


class TrackingConfig(Section):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = "dograph"


class Params(Section):
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    methods: dict[str, MethodConfig] = Field(default_factory=dict)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _methods_known(self) -> "Params":
        missing = [m for m in self.pipeline.methods if m not in self.methods]
        if missing:
            raise ValueError(
                f"pipeline.methods names {missing}, which are not defined under 'methods' "
                f"(defined: {sorted(self.methods)})"
            )
        return self


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(raw: dict, override: str) -> dict:
    """Apply one ``a.b.c=value`` override (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.steps=100")
    key, value = override.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(value)
    return raw


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"  {key} = {shown}: {e['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def validate(raw: dict) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_raw(path: str | Path = "params.yaml", preset: str | None = None, overrides: list[str] | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if preset and preset != "default":
        pfile = PRESET_DIR / f"{preset}.yaml"
        if not pfile.exists():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ConfigError(f"unknown preset {preset!r}; known presets: {['default', *known]}")
        raw = deep_merge(raw, yaml.safe_load(pfile.read_text()) or {})
    for o in overrides or []:
        raw = apply_override(raw, o)
    return raw


def load_params(path: str | Path = "params.yaml", preset: str | None = None, overrides: list[str] | None = None) -> Params:
    """Read, merge and validate the configuration."""
    return validate(load_raw(path, preset, overrides))
