"""The one place where ``params.yaml`` is read into typed, validated objects.

Every section is a pydantic model that forbids unknown keys, so a typo fails with the
key, the value and what was expected. Presets (``configs/presets/<name>.yaml``) are
deep-merged over ``params.yaml`` before validation; ``overrides`` (``a.b.c=value``
strings, as on the CLI) are applied last.

Integers are strict (``steps: true`` is not 1), floats finite. Every YAML error, and every
document whose aliases expand to more than :data:`MAX_YAML_NODES` values, is a
:class:`ConfigError` that names the file or the ``--set`` item. Method names and run ids
become directory names, so they are checked against :data:`NAME_RE`.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.resources
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from dograph_core.partition import PartitionConfig
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator,
)

# configs/presets/ in a checkout (and an editable install); dograph_core/presets/ in an installed wheel
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "presets"
MAX_YAML_NODES = 100_000  # values after alias expansion; a real params file has a few hundred
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")  # a method name or run id: one path component
BEST = "@best"  # in pipeline.scale_methods: the best baseline (lowest worst-domain loss) of the first target scale
YARDSTICK = "uniform_2x"  # the compute yardstick's label: uniform at twice the steps
REORDER = "uniform_reorder"  # the data-order noise's label: uniform again with another data order
REORDER_OFFSET = 1000  # its train.data_seed is the seed plus this
ROLES = {YARDSTICK: "yardstick", REORDER: "reorder"}  # a run's role in the report by its label (else "main")


class ConfigError(ValueError):
    """A bad configuration value: names the key, the value, and what was expected."""


def check_name(value: str, what: str, *, method: bool = False) -> str:
    """``value`` as one safe directory name (``[A-Za-z0-9_.-]+``, not ``.``/``..``); method names without ``__``."""
    if not NAME_RE.fullmatch(value) or ".." in value or value == "." or (method and "__" in value):
        extra = ", no '__' (it separates method, scale and seed in run directories)" if method else ""
        raise ConfigError(f"{what} {value!r}: use letters, digits, '_', '.' and '-' only, no '..'{extra}")
    return value


def _method_name(value: str) -> str:
    if value in ROLES:
        what = "the compute yardstick (pipeline.yardstick_seeds)" if value == YARDSTICK else \
            "the data-order noise (pipeline.reorder_seeds)"
        raise ConfigError(f"method name {value!r} is reserved for {what}")
    return check_name(value, "method name", method=True)


Int = StrictInt  # a YAML `true` or `1.0` is not a count
MethodName = Annotated[str, AfterValidator(_method_name)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


def _label_fields(value: list[str]) -> list[str]:
    if any(not f.strip() for f in value) or len(set(value)) != len(value):
        raise ValueError(f"label_fields {value!r}: give distinct, non-empty field names")
    return value


LabelFields = Annotated[list[str], AfterValidator(_label_fields)]
_LABEL_FIELDS = ("fields (dotted paths) carried to every document as labels, e.g. [topic, format]; a partition "
                 "`{kind: file, file: {column: topic}}` makes them the nodes")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SplitConfig(Section):
    val: float = Field(0.05, ge=0.0, lt=0.5, description="fraction of documents in the validation split")
    test: float = Field(0.05, ge=0.0, lt=0.5, description="fraction of documents in the test split")


class LocalSourceConfig(Section):
    path: Optional[str] = Field(None, description="a directory of <domain>/*.txt, or a .jsonl/.parquet file or directory")
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    domain_field: str = "domain"
    label_fields: LabelFields = Field(default_factory=list, description=_LABEL_FIELDS)


class HFSourceConfig(Section):
    name: Optional[str] = Field(None, description="a datasets name or path, e.g. cerebras/SlimPajama-627B")
    config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    domain_field: str = Field("meta.redpajama_set_name", description="dotted path to the domain label")
    streaming: bool = True
    max_docs: Optional[Int] = Field(None, gt=0, description="stop after this many documents")
    data_files: Optional[list[str]] = Field(None, description="files for a packaged builder such as 'json' or 'parquet'")
    label_fields: LabelFields = Field(default_factory=list, description=_LABEL_FIELDS)


class PrepareConfig(Section):
    source: Literal["default", "local", "hf"] = "default"
    out_dir: str = "data/prepared"
    cache_dir: str = "data/raw"
    total_mb: float = Field(12.0, gt=0, description="characters (MB) kept over all training domains, natural proportions")
    min_ratio: float = Field(20.0, ge=1.0, description="the largest training domain is at least this many times the smallest")
    domains: list[str] = Field(default_factory=list, description="subset of the source's domains (empty = all)")
    heldout: list[str] = Field(default_factory=lambda: ["email"], description="domains kept out of training")
    heldout_mb: float = Field(0.5, gt=0, description="characters (MB) kept of each held-out domain")
    doc_chars: Int = Field(4000, gt=0, description="long texts are cut into documents of about this many characters")
    min_domain_chars: Int = Field(2000, ge=0, description="a domain with less text than this (about one training sequence) is skipped")
    split: SplitConfig = Field(default_factory=SplitConfig)
    seed: Int = 0
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
    vocab_size: Int = Field(4096, ge=260, le=2**20)
    min_frequency: Int = Field(2, ge=1)
    min_tokens: Int = Field(256, ge=1, description="a training domain needs at least this many training tokens (>= train.seq_len + 1)")


class TrainConfig(Section):
    scale: str = "nano"
    seq_len: Int = Field(128, gt=1)
    batch_size: Int = Field(16, gt=0, description="sequences per optimizer step (over all ranks and accumulation)")
    grad_accum: Int = Field(1, gt=0)
    steps: Int = Field(300, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: Int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW's betas, each in [0, 1)")
    grad_clip: float = Field(1.0, ge=0)
    dtype: Literal["fp32", "bf16", "auto"] = Field("fp32", description="auto = bf16 on CUDA, fp32 on CPU")
    compile: bool = False
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N, mps or xpu[:N]")
    threads: Optional[Int] = Field(None, gt=0)
    eval_every: Int = Field(100, ge=0)
    eval_windows: Int = Field(32, gt=0, description="fixed validation windows per domain")
    ckpt_every: Int = Field(0, ge=0, description="0 = only at the end")
    max_epochs: Optional[float] = Field(None, gt=0, description="cap on repetitions of any domain's data")
    seed: Int = 0
    data_seed: Optional[Int] = Field(
        None, ge=0, description="the sampler's seed (which sequences each step reads), apart from the model's "
                                "initialisation; None = seed. A fixed value gives every seed (and method) the same "
                                "data order; two runs that differ only here measure how much the data order alone "
                                "moves the loss (pipeline.reorder_seeds does that per seed)")
    progress: bool = True
    log_every: Int = Field(1, gt=0, description="log step metrics (tracker, metrics.jsonl) every this many steps")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        # checked here, not by torch when the first run starts: a typo must fail before any stage runs
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", v):
            raise ValueError(f"{v!r} is not a device: use auto, cpu, cuda, cuda:N, mps or xpu[:N]")
        return v


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
    seeds: list[Int] = Field(default_factory=lambda: [0])
    search_steps: Optional[Int] = Field(None, gt=0, description="steps of the proxy search (default: train.steps)")
    max_parallel: Int = Field(1, gt=0)
    task_runner: Literal["thread", "process", "dask"] = "thread"
    dask_address: Optional[str] = Field(None, description="scheduler of an existing Dask cluster (default: a local cluster)")
    nproc_per_node: Int = Field(1, gt=0, description="processes (GPUs) per training run; > 1 launches each run with torchrun")
    out_dir: str = "runs"
    # the study: which methods at which scale, the compute yardstick, ablation parents (README, "How the pipeline is built")
    scale_methods: dict[str, list[str]] = Field(
        default_factory=dict, description=f"per target scale, the methods trained there (default: `methods` at every "
                                          f"target scale; a scale not in target_scales is not trained); {BEST!r} = "
                                          f"the best baseline of the first target scale")
    yardstick_seeds: list[Int] = Field(
        default_factory=list, description="seeds of uniform trained for 2x train.steps at every target scale: "
                                          "the compute yardstick (gains are reported as a fraction of its gain)")
    reorder_seeds: list[Int] = Field(
        default_factory=list, description=f"seeds of uniform trained again with another data order (train.data_seed = "
                                          f"seed + {REORDER_OFFSET}) at every target scale: how much the data order alone "
                                          f"moves the loss, which pairing by seed does not remove once two methods' "
                                          f"weights differ (reported next to the paired differences)")
    parents: dict[str, str] = Field(
        default_factory=dict, description="ablations: method -> the method it changes (compared with it, paired by seed)")
    search_train: dict[str, Any] = Field(
        default_factory=dict, description="train settings of the proxy search that differ from `train` (e.g. device)")
    cleanup: bool = Field(False, description="delete the checkpoints and final model of each finished training "
                                             "(big models; the report needs only the run's metrics)")

    @model_validator(mode="after")
    def _study(self) -> "PipelineConfig":
        lists = {"target_scales": self.target_scales, "seeds": self.seeds, "yardstick_seeds": self.yardstick_seeds,
                 "reorder_seeds": self.reorder_seeds,
                 "methods": self.methods, **{f"scale_methods.{k}": v for k, v in self.scale_methods.items()}}
        for key, values in lists.items():  # two units would write one run directory
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"{key} lists {twice} more than once")
        first = self.target_scales[0] if self.target_scales else None
        if first is not None and BEST in self.methods_at(first):
            raise ValueError(f"{BEST!r} is the best baseline of the first target scale ({first}); "
                             f"it can only be trained at later scales (scale_methods)")
        unpaired = sorted(set(self.reorder_seeds) - set(self.seeds))
        if unpaired:
            raise ValueError(f"reorder_seeds {unpaired} are not in seeds {self.seeds}: each is paired with uniform "
                             f"at the same seed")
        lacking = [s for s in self.target_scales if "uniform" not in self.methods_at(s)] if self.reorder_seeds else []
        if lacking:
            raise ValueError(f"reorder_seeds pairs uniform_reorder with uniform, which is not trained at {lacking}: "
                             f"add uniform to those scales' methods")
        selfish = [m for m, parent in self.parents.items() if m == parent]
        if selfish:
            raise ValueError(f"parents: {selfish} name themselves as their parent")
        bad = sorted(set(self.search_train) & {"scale", "seed", "steps"})
        if bad:
            raise ValueError(f"search_train sets {bad}: the search runs at proxy_scale for search_steps steps "
                             f"with the first seed; set those instead")
        return self

    def methods_at(self, scale: str) -> list[str]:
        """The methods trained at ``scale`` (may contain the :data:`BEST` placeholder)."""
        return list(self.scale_methods.get(scale, self.methods))

    def all_methods(self) -> list[str]:
        """Every method named by the study, in order, without the placeholder."""
        names = [m for s in self.target_scales for m in self.methods_at(s)]
        return [m for m in dict.fromkeys(names) if m != BEST]


class TrackingConfig(Section):
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    experiment: str = "dograph"
    log_model: bool = Field(True, description="log each trained model with MLflow's transformers flavor")
    registered_model: Optional[str] = Field(None, description="also register each logged model under this name")


PartitionName = Annotated[str, AfterValidator(lambda v: check_name(v, "partition name"))]


class Params(Section):
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    partitions: dict[PartitionName, PartitionConfig] = Field(
        default_factory=dict, description="named partitions of the corpus into nodes; a method trains over one with "
                                          "`partition: <name>` (default: the human sources)")
    methods: dict[MethodName, MethodConfig] = Field(default_factory=dict)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _methods_known(self) -> "Params":
        named = [*self.pipeline.all_methods(), *self.pipeline.parents, *self.pipeline.parents.values()]
        if self.pipeline.yardstick_seeds or self.pipeline.reorder_seeds:
            named.append("uniform")
        if self.pipeline.search_train:  # the search's train settings, validated like train's
            try:
                TrainConfig.model_validate({**self.train.model_dump(), **self.pipeline.search_train})
            except ValidationError as e:
                raise ValueError("pipeline.search_train: " + "; ".join(describe_errors(e))) from None
        missing = list(dict.fromkeys(m for m in named if m not in self.methods))
        if missing:
            raise ValueError(
                f"pipeline names methods {missing} that are not defined under 'methods' "
                f"(defined: {sorted(self.methods)})"
            )
        for name, m in self.methods.items():
            part = (m.model_extra or {}).get("partition")
            if isinstance(part, dict):  # already computed: {"name", "key", "dir"} (a torchrun launch writes it so)
                part = part.get("name") if set(part) <= {"name", "key", "dir"} and "dir" in part else part
            if part is not None and (not isinstance(part, str) or part not in self.partitions):
                raise ValueError(f"methods.{name}.partition = {part!r}: not a partition defined under 'partitions' "
                                 f"(defined: {sorted(self.partitions)})")
        return self


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand to more than MAX_YAML_NODES values.

    Aliases are shared, so loading a "billion laughs" is cheap, but everything that walks the
    result (validation, error messages, hashing, MLflow) would pay for the full expansion.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        sizes: dict[int, int] = {}

        def size(n: yaml.Node) -> int:
            if id(n) not in sizes:
                sizes[id(n)] = 1  # a self-referencing alias counts once
                kids = n.value if isinstance(n, yaml.SequenceNode) else (
                    [x for kv in n.value for x in kv] if isinstance(n, yaml.MappingNode) else [])
                sizes[id(n)] = min(1 + sum(size(k) for k in kids), MAX_YAML_NODES + 1)
            return sizes[id(n)]

        if size(node) > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"YAML aliases (*name) expand this document to more than {MAX_YAML_NODES} values",
                node.start_mark)
        return super().construct_document(node)


def load_yaml(source: str | Path, where: Optional[str] = None) -> Any:
    """``yaml.safe_load`` of a string or a file (plus the alias limit).

    Any YAML error, undecodable bytes included (YAML decodes the file itself), is a ConfigError
    that names the file or ``where``.
    """
    try:
        with contextlib.ExitStack() as stack:
            stream = stack.enter_context(open(source, "rb")) if isinstance(source, Path) else source
            loader = _Loader(stream)  # a file's marks name it: `in "params.yaml", line 3`
            if where is not None:
                loader.name = where
            stack.callback(loader.dispose)
            return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{where or source}: not valid YAML: {e}") from None


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
    node[parts[-1]] = load_yaml(value, f"--set {_SHORT.repr(override)}")
    return raw


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxlevel = 80, 80, 8, 8, 3


def describe_errors(err: ValidationError) -> list[str]:
    """One ``key = value: problem`` line per error of a pydantic validation (values shown short)."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "missing":
            lines.append(f"{key}: {e['msg']}")
            continue
        value = e.get("input")
        shown = _SHORT.repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"{key} = {shown}: {e['msg']}")
    return lines


def _format_error(err: ValidationError) -> str:
    return "invalid configuration:\n" + "\n".join(f"  {line}" for line in describe_errors(err))


def validate(raw: dict) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def preset_dir() -> Path:
    """Where the presets are: the package's ``presets/`` (importlib.resources) when installed from a
    wheel, else the checkout's ``configs/presets/`` (a source tree, an editable install, DVC)."""
    with contextlib.suppress(ModuleNotFoundError, TypeError):
        packaged = importlib.resources.files("dograph_core") / "presets"
        if packaged.is_dir() and isinstance(packaged, Path):
            return packaged
    return PRESET_DIR


def list_presets() -> dict[str, Path]:
    """``{name: file}`` of every preset, sorted by name."""
    return {p.stem: p for p in sorted(preset_dir().glob("*.yaml"))}


def load_raw(path: str | Path = "params.yaml", preset: str | None = None, overrides: list[str] | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if preset and preset != "default":
        presets = list_presets()
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r}; known presets: {['default', *sorted(set(presets) - {'default'})]}")
        raw = deep_merge(raw, load_yaml(presets[preset]) or {})
    for o in overrides or []:
        raw = apply_override(raw, o)
    return raw


def load_params(path: str | Path = "params.yaml", preset: str | None = None, overrides: list[str] | None = None) -> Params:
    """Read, merge and validate the configuration."""
    return validate(load_raw(path, preset, overrides))
