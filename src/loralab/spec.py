"""The experiment file: pydantic models by topic, composed into one validated `Experiment`.

Every problem in a file is collected and reported at once, each with its field path, the line in
the YAML file, the value received and how to fix it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import Problem, SpecError, shorten

BUILTIN_MODEL = "builtin:smollm2-135m"
RESERVED_RUN_NAMES = {"base"}  # the untrained model is stored as run "base"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")  # "+": ablation runs such as A+lr; used with fullmatch
RUN_NAME_RULE = ("use 1 to 64 ASCII letters, digits, '_', '-', '.' or '+', starting with a letter or digit; "
                 "'base' is reserved for the untrained model")
# The largest whole number a knob may hold: it must fit the store (SQLite INTEGER) and the seeding of
# numpy (below 2**32) and torch; anything larger is a typo, not a plan.
MAX_INT = 2**31 - 1
MAX_SEED = MAX_INT
MAX_FILE_BYTES = 1_000_000  # an experiment file is a page of settings; a bigger one is not one of ours
MAX_YAML_NODES = 100_000  # after aliases are expanded: bounds the work on an alias bomb


def is_run_name(name: str) -> bool:
    return RUN_NAME.fullmatch(name) is not None and name not in RESERVED_RUN_NAMES


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` pass `gt=0`-style bounds (NaN compares false both ways).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _bounded_ints(cls, v: Any) -> Any:
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, int) and not isinstance(x, bool) and abs(x) > MAX_INT:
                raise ValueError(f"a whole number too large to store or train with; fix: use at most {MAX_INT}")
        return v


class LoraSpec(_Strict):
    """PEFT LoraConfig knobs."""

    r: int = Field(8, gt=0, le=4096, description="LoRA rank")
    # alpha = 2r when unset: common practice, keeps the update scale alpha/r = 2 as r changes.
    alpha: float | None = Field(None, gt=0, description="lora_alpha; default 2 * r")
    dropout: float = Field(0.05, ge=0, lt=1, description="lora_dropout")
    # `query_key_value` is GPT-NeoX naming; models without it get their own q/k/v projections.
    target_modules: list[str] = Field(default_factory=lambda: ["query_key_value"], min_length=1)
    bias: Literal["none", "all", "lora_only"] = "none"

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("target_modules")
    @classmethod
    def _all_linear_alone(cls, v: list[str]) -> list[str]:
        if "all-linear" in v and len(v) > 1:
            others = ", ".join(x for x in v if x != "all-linear")
            raise ValueError(f"all-linear already means every linear layer, so it cannot be listed with {others}; "
                             f"fix: write `target_modules: all-linear` alone, or list only layer names ([{others}])")
        return v

    @model_validator(mode="after")
    def _default_alpha(self) -> "LoraSpec":
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.r))
        return self


class TrainSpec(_Strict):
    """Optimiser and schedule. One step = batch_size * gradient_accumulation examples."""

    learning_rate: float = Field(2e-4, gt=0, lt=1)
    batch_size: int = Field(2, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
    ] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_seq_len: int = Field(512, ge=8)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _one_warmup(self) -> "TrainSpec":
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both; fix: remove one of them")
        return self

    def planned_steps(self, n_examples: int) -> int:
        """Optimizer steps for the run: max_steps, else epochs over the data."""
        if self.max_steps:
            return self.max_steps
        micro_per_epoch = math.ceil(n_examples / self.batch_size)
        return max(1, math.ceil(self.epochs * micro_per_epoch / self.gradient_accumulation))


class GenerateSpec(_Strict):
    """Greedy generation on the eval prompts. Every cap comes from one generation at the largest."""

    max_new_tokens: list[int] = Field(default_factory=lambda: [64], min_length=1)
    batch_size: int = Field(16, ge=1)

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _one_cap_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("max_new_tokens")
    @classmethod
    def _positive_caps(cls, v: list[int]) -> list[int]:
        if any(c <= 0 for c in v):
            raise ValueError("every max_new_tokens must be > 0")
        return sorted(set(v))


class DataSpec(_Strict):
    """Where examples come from. Exactly one of builtin, path, hf. Relative paths: the file's folder."""

    builtin: Literal["stdlib-docstrings"] | None = None
    path: str | None = Field(None, description="JSONL or CSV file (by suffix)")
    eval_path: str | None = Field(None, description="separate eval file; else split from path")
    hf: str | None = Field(None, description="Hugging Face dataset id or a save_to_disk folder")
    hf_config: str | None = None
    split: str = "train"
    eval_split: str | None = None
    instruction_field: str = "instruction"
    input_field: str | None = "input"  # appended to the instruction when present and non-empty
    output_field: str = "output"
    system_prompt: str | None = None  # None: the chat template's own default
    # Off: an example longer than train.max_seq_len is an error, because cutting it trains an answer
    # that never ends (the end token is what is cut). On: such examples are cut.
    truncate: bool = False
    train_size: int | None = Field(None, gt=0, description="cap on training examples")
    eval_size: int | None = Field(None, gt=0, description="cap on eval examples")
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the train/eval split")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        given = [k for k in ("builtin", "path", "hf") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one data source, not {' and '.join(given)}")
        if not given:
            object.__setattr__(self, "builtin", "stdlib-docstrings")
        return self


class ModelSpec(_Strict):
    """A base model: `builtin:smollm2-135m`, a Hugging Face id, or a local folder."""

    name: str = BUILTIN_MODEL
    revision: str | None = None
    # Off unless asked: a hub repo's own Python code would run on this machine.
    trust_remote_code: bool = False


class RunSpec(_Strict):
    """One fully resolved run: what is trained and how it is evaluated."""

    name: str
    lora: LoraSpec
    train: TrainSpec
    generate: GenerateSpec

    def with_seed(self, seed: int) -> "RunSpec":
        return self.model_copy(update={"train": self.train.model_copy(update={"seed": seed})})


class CostSpec(_Strict):
    """Turns measured hours into money: a cloud GPU's or your own machine's price per hour."""

    per_hour: float = Field(..., gt=0)
    currency: str = "USD"


# Evaluation settings that change how results are read, not what is measured: left out of run ids, so
# changing them reuses every stored run.
ANALYSIS_ONLY = {"confidence", "bootstrap_resamples", "min_effect"}


class EvaluationSpec(_Strict):
    """What is measured beyond quality on the eval set."""

    # Drift: KL(base || adapted) on general prompts that are not the task (shipped with loralab).
    drift: bool = True
    drift_prompts: int | None = Field(None, gt=0, description="use the first N general prompts")
    drift_max_new_tokens: int = Field(32, gt=0)
    # Loss on training examples too, so overfitting shows as a train/eval gap. None: as many as eval.
    train_loss_examples: int | None = Field(None, ge=0)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    # Read by nothing since intervals are analytic (docs/statistics.md); accepted so older files load.
    bootstrap_resamples: int = Field(5000, ge=100, le=100_000)
    # The smallest difference worth acting on, per metric (in its own unit; a share such as exact_match
    # as a fraction: 0.02 is 2 points). An interval inside (-floor, +floor) reads "negligible".
    min_effect: dict[str, float] = Field(default_factory=dict)

    @field_validator("min_effect")
    @classmethod
    def _known_metrics(cls, v: dict[str, float]) -> dict[str, float]:
        from .metric_table import metric_bases

        known = metric_bases()
        for key, floor in v.items():
            if key.partition("@")[0] not in known:
                raise ValueError(f"min_effect names no stored metric: {str(key)[:40]!r}; use one of: "
                                 f"{', '.join(sorted(known))}")
            if not (isinstance(floor, (int, float)) and 0 <= floor < float("inf")):
                raise ValueError(f"min_effect.{key} must be a finite number >= 0, got {floor!r}")
        return v


Scalar = bool | int | float | str | None  # what Optuna can store as a categorical choice


class KnobSpec(_Strict):
    """One dimension of a sweep: choices (`values` or a bare list), a range (`low`..`high`), or,
    with `ratio_of`, a multiple of another knob (alpha = ratio * r keeps the update scale alpha/r)."""

    values: list[Scalar] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False  # sample on a log scale: right for learning rates, which matter by factors
    step: float | None = Field(None, gt=0)
    type: Literal["int", "float"] | None = Field(None, description="default: the knob's own type")
    ratio_of: str | None = Field(None, description="another knob of the space; the value is ratio * that knob")

    @model_validator(mode="before")
    @classmethod
    def _list_is_choices(cls, v: Any) -> Any:
        return {"values": v} if isinstance(v, list) else v

    @field_validator("values")
    @classmethod
    def _numbers_as_numbers(cls, v: list | None) -> list | None:
        # YAML 1.1 reads `1e-4` as text; a choice that reads as a number is one.
        def num(x: Any) -> Any:
            if isinstance(x, str):
                try:
                    f = float(x)
                except ValueError:
                    return x
                if not math.isfinite(f):
                    raise ValueError(f"{x!r} is not a finite number; fix: use numbers such as 1e-4")
                return f
            return x

        return None if v is None else [num(x) for x in v]

    @model_validator(mode="after")
    def _one_form(self) -> "KnobSpec":
        has_range = self.low is not None or self.high is not None
        if self.values == []:
            raise ValueError("no choices to try: give at least one value")
        if self.values is not None and has_range:
            raise ValueError("give `values` or `low`/`high`, not both")
        if self.values is None and not has_range:
            raise ValueError("give a list of choices, or `low:` and `high:`")
        if has_range:
            if self.low is None or self.high is None:
                raise ValueError("a range needs both `low` and `high`")
            if self.low >= self.high:
                raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
            if self.log and self.low <= 0:
                raise ValueError(f"a log range needs low > 0 (got {self.low:g})")
            if self.log and self.step is not None:
                raise ValueError("`log` and `step` cannot be combined; fix: remove one of them")
        return self


class ObjectiveSpec(_Strict):
    """What a trial is judged by: a stored metric key such as eval_loss or rouge_l@64.

    A per-cap metric without `@cap` (rouge_l) means the trial's own largest max_new_tokens."""

    metric: str = "eval_loss"
    direction: Literal["minimize", "maximize"] | None = Field(None, description="default: maximize for quality scores, else minimize")

    @model_validator(mode="before")
    @classmethod
    def _string_is_metric(cls, v: Any) -> Any:
        return {"metric": v} if isinstance(v, str) else v

    @property
    def resolved_direction(self) -> str:
        from .metric_table import better_of

        return self.direction or ("maximize" if better_of(self.metric) == "higher" else "minimize")


class PrunerSpec(_Strict):
    """Stop trials that are clearly worse than the others, judged by held-out loss every `every` steps."""

    name: Literal["median", "successive_halving", "hyperband", "none"] = "median"
    every: int = Field(10, gt=0, description="optimizer steps between intermediate eval losses")
    # Median: no trial is pruned until this many have finished, so the median means something.
    startup_trials: int = Field(2, ge=0)
    warmup_steps: int = Field(0, ge=0, description="no pruning before this step")
    eval_examples: int | None = Field(None, gt=0, description="intermediate loss on the first N eval examples (cheaper)")
    reduction_factor: int | None = Field(None, ge=2, description="successive_halving / hyperband: keep 1 in this many "
                                         "trials per rung (default: Optuna's, 4 and 3)")

    @property
    def resolved_reduction_factor(self) -> int:
        return self.reduction_factor or (3 if self.name == "hyperband" else 4)


class BudgetSpec(_Strict):
    """When the sweep stops: whichever limit is reached first (checked between trials)."""

    trials: int | None = Field(None, gt=0)
    minutes: float | None = Field(None, gt=0)
    money: float | None = Field(None, gt=0, description="in the currency of `cost:`, at cost.per_hour")


class SweepSpec(_Strict):
    """An Optuna search over lora/train/generate knobs, starting from `defaults` or from one run."""

    strategy: str = Field("tpe", description="grid, random, tpe, or an Optuna sampler class name such as QMCSampler")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    start: str | None = Field(None, alias="from", description="a run of the file to start from; default: defaults")
    space: dict[str, KnobSpec] = Field(..., min_length=1)
    objective: list[ObjectiveSpec] = Field(default_factory=lambda: [ObjectiveSpec()], min_length=1, max_length=3)
    pruner: PrunerSpec | None = Field(None, description="default: median for one objective, none for several")
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    storage: str | None = Field(None, description="SQLAlchemy URL of the Optuna study; default: optuna.db in the workspace")
    # auto: a trial measures what its objective needs (a loss objective skips greedy generation and
    # drift, which cost about as much as training on a CPU); full: every trial gets every metric.
    evaluate: Literal["auto", "full"] = "auto"

    @field_validator("objective", mode="before")
    @classmethod
    def _one_objective_is_a_list(cls, v: Any) -> Any:
        return v if isinstance(v, list) else [v]

    @property
    def directions(self) -> list[str]:
        return [o.resolved_direction for o in self.objective]

    @property
    def resolved_pruner(self) -> PrunerSpec:
        # Optuna prunes only single-objective studies (Trial.report raises otherwise).
        return self.pruner or PrunerSpec(name="median" if len(self.objective) == 1 else "none")


class Defaults(_Strict):
    lora: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    generate: dict[str, Any] = Field(default_factory=dict)


class Experiment(_Strict):
    """A validated experiment file."""

    # Names the study and the runs' group (`loralab show NAME/run`), and may name files: never a path.
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+ -]{0,127}$")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workspace: str | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    runs: dict[str, Defaults] = Field(default_factory=dict)
    # Each run is trained once per seed; metrics are then reported as mean and confidence interval.
    repeats: int = Field(1, ge=1, le=100)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(None, min_length=1, max_length=100)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    cost: CostSpec | None = None
    sweep: SweepSpec | None = None
    # Filled by load_experiment, not by the file.
    resolved_runs: list[RunSpec] = Field(default_factory=list, exclude=True)
    source: str | None = Field(None, exclude=True)

    @field_validator("model", mode="before")
    @classmethod
    def _model_as_string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _seeds_match_repeats(self) -> "Experiment":
        if self.seeds is not None:
            if "repeats" in self.model_fields_set and self.repeats != len(self.seeds):
                raise ValueError(f"repeats is {self.repeats} but {len(self.seeds)} seeds are listed: give one of them")
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError("seeds must be different from each other")
        return self

    def seeds_for(self, run: "RunSpec") -> list[int]:
        """The seeds a run is trained with: `seeds`, else `repeats` seeds counting up from train.seed."""
        if self.seeds is not None:
            return list(self.seeds)
        return [run.train.seed + i for i in range(self.repeats)]

    @property
    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    def resolve_path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q

    @property
    def eval_caps(self) -> list[int]:
        """Every max_new_tokens cap any run asks for; generation runs once at the largest."""
        caps = {c for r in self.resolved_runs for c in r.generate.max_new_tokens}
        knob = self.sweep.space.get("generate.max_new_tokens") if self.sweep else None
        if knob is not None and knob.values:  # every trial is measured at every cap, so runs stay comparable
            caps |= {int(c) for c in knob.values if isinstance(c, (int, float)) and not isinstance(c, bool)}
        return sorted(caps) or GenerateSpec().max_new_tokens

    def run(self, name: str) -> RunSpec:
        for r in self.resolved_runs:
            if r.name == name:
                return r
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# Loading, with all problems collected


_FIXES = {
    "extra_forbidden": "remove it or check its spelling; allowed here: {allowed}",
    "missing": "add this field",
    "float_parsing": "use a number such as 2e-4",
    "float_type": "use a number such as 2e-4",
    "int_parsing": "use a whole number such as 8",
    "int_type": "use a whole number such as 8",
    "int_from_float": "use a whole number such as 8",
    "greater_than": "use a value above {gt}",
    "greater_than_equal": "use a value of at least {ge}",
    "less_than": "use a value below {lt}",
    "less_than_equal": "use a value of at most {le}",
    "literal_error": "use one of {expected}",
    "bool_parsing": "use true or false",
    "dict_type": "write a mapping (key: value lines)",
    "list_type": "write a list, e.g. [a, b]",
    "too_short": "give at least one value",
    "string_type": "write text",
    "string_pattern_mismatch": "use 1 to 128 ASCII letters, digits, spaces, '_', '-', '.' or '+', starting with a letter or digit",
    "finite_number": "use a finite number (`.inf` and `.nan` cannot be trained with)",
    "model_type": "write a mapping of settings, e.g. `{{lora: {{r: 8}}}}`, or `{{}}` for the defaults",
    "too_long": "give at most {max_length}",
}


def _allowed_keys(model: type[BaseModel], loc: tuple) -> str:
    """The field names valid at the parent of `loc`, to suggest when a key is unknown."""
    cur: Any = model
    for part in loc[:-1]:
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return ""
        ann = fields[part].annotation
        cur = next((a for a in getattr(ann, "__args__", ()) if hasattr(a, "model_fields")), ann)
    names = getattr(cur, "model_fields", {})
    return ", ".join(f.alias or n for n, f in names.items() if not f.exclude)


def _problems(err: ValidationError, prefix: str, model: type[BaseModel], lines: dict) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(loc))
        ctx = dict(e.get("ctx") or {})
        if e["type"] == "extra_forbidden":
            ctx["allowed"] = _allowed_keys(model, loc) or "see the docs"
        fix = _FIXES.get(e["type"], "").format(**{k: ctx.get(k, "") for k in ("gt", "ge", "lt", "le", "expected", "allowed",
                                                                               "max_length")}) if e["type"] in _FIXES else ""
        msg = {"extra_forbidden": "unknown key", "string_pattern_mismatch": "not a plain name (it names the study and the "
               "runs' group, and may name files: no '/', no leading '.')",
               "model_type": "not a mapping of settings"}.get(e["type"], e["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if "; fix: " in msg:  # a validator's own fix
            msg, fix = msg.split("; fix: ", 1)
        if e["type"] == "model_type" and path.startswith("sweep.space."):
            fix = "give a list of choices, e.g. [4, 8, 16], or a range such as {low: 1.0e-5, high: 1.0e-3, log: true}"
        elif e["type"] == "model_type" and _allowed_keys(model, loc + ("",)):
            fix = f"write a mapping of its settings ({_allowed_keys(model, loc + ('',))})"
        where = path or "(file)"
        if path in lines:
            where = f"{where} (line {lines[path]})"
        has_value = e["type"] not in ("missing",) and not (isinstance(e.get("input"), dict))
        out.append(Problem(where, msg, e.get("input"), fix, has_value))
    return out


def _line_index(text: str) -> dict[str, int]:
    """Map dotted key paths to their 1-based line in the YAML text, for error messages."""
    index: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return index

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = f"{path}.{k.value}" if path else str(k.value)
                index[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                index[f"{path}.{i}"] = v.start_mark.line + 1
                walk(v, f"{path}.{i}")

    if root is not None:
        walk(root, "")
    return index


def _duplicate_keys(text: str) -> list[Problem]:
    """Keys given twice in one mapping: YAML keeps the last silently, so a run declared twice would
    quietly replace the first."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    out = []

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                p = f"{path}.{k.value}" if path else str(k.value)
                line = k.start_mark.line + 1
                if k.value in first and k.value != "<<":
                    out.append(Problem(f"{p} (line {line})", f"duplicate key, first given on line {first[k.value]}",
                                       k.value, "give each key once (rename one of the runs, or merge the two entries)"))
                first.setdefault(k.value, line)
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, f"{path}.{i}")

    if root is not None:
        walk(root, "")
    return out


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


_TOPICS: dict[str, type[BaseModel]] = {"lora": LoraSpec, "train": TrainSpec, "generate": GenerateSpec}


def parse_experiment(raw: Any, source: str | None = None, text: str | None = None) -> Experiment:
    """Validate a parsed YAML document; raise SpecError listing every problem."""
    where = source or "experiment"
    lines = _line_index(text) if text else {}
    if raw is None:  # an empty file (or comments only) would silently train every default on the built-in model
        raise SpecError(f"{where}: the file is empty",
                        [Problem("(file)", "no settings", None, "add at least `runs: {A: {}}` (see examples/ for a start)", False)])
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: the file must be a mapping of keys (model, data, defaults, runs, …)",
                        [Problem("(file)", "top level is not a mapping", type(raw).__name__, "start with keys such as `model:` and `runs:`")])
    problems: list[Problem] = _duplicate_keys(text) if text else []
    try:
        exp = Experiment.model_validate(raw)
    except ValidationError as err:
        problems.extend(_problems(err, "", Experiment, lines))
        exp = None

    runs_raw = raw.get("runs") if isinstance(raw.get("runs"), dict) else {}
    defaults_raw = raw.get("defaults") if isinstance(raw.get("defaults"), dict) else {}
    if "runs" in raw and not runs_raw:
        problems.append(Problem("runs" + (f" (line {lines['runs']})" if "runs" in lines else ""),
                                "no runs declared", raw.get("runs"), "add at least one named run, e.g. `runs: {A: {}}`"))
    resolved: list[RunSpec] = []
    seen_default_problems: set[str] = set()
    for name, override in (runs_raw or {}).items():
        name_s = str(name)
        if not is_run_name(name_s):
            label = name_s if name_s.isprintable() and len(name_s) <= 60 else shorten(name_s, 60)
            problems.append(Problem(f"runs.{label}", "invalid run name", name_s, RUN_NAME_RULE))
            continue
        override = override if isinstance(override, dict) else {}
        parts: dict[str, Any] = {}
        for topic, model in _TOPICS.items():
            d = defaults_raw.get(topic) if isinstance(defaults_raw.get(topic), dict) else {}
            o = override.get(topic) if isinstance(override.get(topic), dict) else {}
            merged = deep_merge(d, o)
            try:
                parts[topic] = model.model_validate(merged)
            except ValidationError as err:
                for p in _problems(err, "", model, {}):
                    key = p.where.split(" ")[0].split(".")[0]
                    from_run = key in o or (p.where == "(file)" and o)
                    prefix = f"runs.{name_s}.{topic}" if from_run else f"defaults.{topic}"
                    path = f"{prefix}.{p.where}" if p.where != "(file)" else prefix
                    if not from_run:
                        if path in seen_default_problems:
                            continue
                        seen_default_problems.add(path)
                    full = path + (f" (line {lines[path]})" if path in lines else "")
                    problems.append(Problem(full, p.message, p.value, p.fix, p.has_value))
        if len(parts) == len(_TOPICS):
            resolved.append(RunSpec(name=name_s, **parts))
    if isinstance(raw.get("sweep"), dict):
        from .sweep import check_sweep

        problems.extend(check_sweep(raw, resolved, lines))
    if problems:
        n = len(problems)
        raise SpecError(f"{where}: {n} problem{'s' if n > 1 else ''} in the experiment file", problems)
    assert exp is not None
    if not resolved:  # no runs key: one run from the defaults
        resolved = [RunSpec(name="default", **{t: m.model_validate(defaults_raw.get(t) or {}) for t, m in _TOPICS.items()})]
    exp.resolved_runs = resolved
    exp.source = source
    return exp


def not_a_file(path: Path) -> str | None:
    """Why `path` cannot be read as a file ("file not found", "a folder, not a file", ...), or None when it can.

    A FIFO or a device is never opened: reading one could block for ever or never end."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as err:
        return f"cannot be read ({err.strerror or type(err).__name__})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a file"
    return "not a regular file"


def _yaml_bomb(root: Any) -> str | None:
    """Why a composed YAML document is unsafe to build: it contains itself through an alias, or its
    aliases expand to more than MAX_YAML_NODES nodes. Node by node, each node once: linear in the text."""
    def children(node: Any) -> list:
        if isinstance(node, yaml.MappingNode):
            return [x for kv in node.value for x in kv]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    size: dict[int, int] = {}
    open_: set[int] = set()  # entered, not finished: the path from the root to the current node
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_.discard(key)
            size[key] = min(1 + sum(size[id(c)] for c in children(node)), MAX_YAML_NODES + 1)
            continue
        if key in size:
            continue
        if key in open_:
            return "an alias refers to a structure that contains it (a recursive alias)"
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in size)
    if size[id(root)] > MAX_YAML_NODES:
        return f"its aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb)"
    return None


def load_experiment(path: str | Path) -> Experiment:
    """Read, parse and validate an experiment file."""
    p = Path(path)
    why = not_a_file(p)
    if why is not None:
        missing = why == "file not found"
        raise SpecError(f"{p}: " + ("no such experiment file" if missing else f"{why}, not an experiment file"),
                        [Problem(str(p), why, str(p), "check the path" if missing else "give the path of a YAML experiment file",
                                 False)])
    if p.stat().st_size > MAX_FILE_BYTES:
        raise SpecError(f"{p}: too large for an experiment file", [Problem(
            str(p), f"{p.stat().st_size:,} bytes, more than {MAX_FILE_BYTES:,}", str(p),
            "keep data in data files (data.path); the experiment file holds settings", False)])
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        where = f"{p}:{line}"
        raise SpecError(f"{where}: not UTF-8 text", [Problem(where, "not UTF-8 text", data[err.start:err.start + 8],
                                                            "save the file as UTF-8")]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        bomb = _yaml_bomb(root) if root is not None else None
        if bomb:
            raise SpecError(f"{p}: refusing to read the file: {bomb}",
                            [Problem(str(p), bomb, None, "write the values out, without aliases (&name / *name)", False)])
        raw = yaml.safe_load(text)
    except RecursionError:
        raise SpecError(f"{p}: nested too deeply to read",
                        [Problem(str(p), "lists or mappings nested hundreds of levels deep", None,
                                 "an experiment file nests a few levels: check the brackets", False)]) from None
    except ValueError as err:  # PyYAML's int() of a number with thousands of digits
        raise SpecError(f"{p}: a value cannot be read: {str(err).split(';')[0]}",
                        [Problem(str(p), "a number far too long to be a setting", None,
                                 "check the file for a pasted blob of digits", False)]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"{p}:{mark.line + 1}" if mark else str(p)
        raise SpecError(f"{line}: not valid YAML: {getattr(err, 'problem', err)}",
                        [Problem(line, "YAML syntax error", None, "check indentation and colons near that line", False)]) from None
    try:
        return parse_experiment(raw, str(p), text)
    except RecursionError:
        raise SpecError(f"{p}: nested too deeply to read",
                        [Problem(str(p), "lists or mappings nested too deep", None,
                                 "an experiment file nests a few levels: check the brackets", False)]) from None


def surprises(exp: Experiment) -> list[str]:
    """Settings that are valid but probably not what was meant: each worth one line, not an error."""
    out = []
    first: dict[str, str] = {}
    for run in exp.resolved_runs:
        same = config_hash([run.lora.model_dump(), run.train.model_dump(), run.generate.model_dump()])
        if same in first:
            out.append(f"runs {first[same]} and {run.name} have the same settings: {run.name} is {first[same]} again "
                       "(stored once, reported twice)")
        first.setdefault(same, run.name)
        if {"epochs", "max_steps"} <= run.train.model_fields_set:
            out.append(f"run {run.name}: train.epochs ({run.train.epochs:g}) and train.max_steps ({run.train.max_steps}) "
                       "are both set; max_steps decides, epochs is ignored")
    if "eval_fraction" in exp.data.model_fields_set and (exp.data.eval_path or exp.data.eval_split):
        out.append(f"data.eval_fraction ({exp.data.eval_fraction:g}) is ignored: the eval set is "
                   + ("data.eval_path" if exp.data.eval_path else "data.eval_split"))
    return out


def check_data_paths(exp: Experiment) -> list[Problem]:
    """Files the experiment names must exist: checked before anything is trained or written."""
    problems = []
    for key in ("path", "eval_path"):
        v = getattr(exp.data, key)
        why = not_a_file(exp.resolve_path(v)) if v else None
        if why is not None:
            problems.append(Problem(f"data.{key}", why, v,
                                    f"give a JSONL or CSV file; relative paths are read from {exp.base_dir}"))
    return problems


def config_hash(obj: Any) -> str:
    """Stable short hash of JSON-able data (run ids, fingerprints)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
