"""The experiment file's schema: pydantic models by topic, composed into one validated `Experiment`.

Loading a file (every problem collected and reported at once, each with its field path, line, value
and fix) is loading.py's; the sweep section's space and checks are search_space.py's."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

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


VARIANTS = ("use_rslora", "use_dora", "loraplus_lr_ratio", "layers", "rank_pattern", "alpha_pattern", "init")
# How LoRA's A and B start: PEFT's default (A random, B zero), gaussian, or from the base weights' own
# structure: PiSSA (principal singular vectors, exact SVD; pissa_niter_N: a fast randomized SVD with N
# iterations) or OLoRA (QR). PiSSA and OLoRA change the base weights while training; loralab keeps the
# shared base as it was and stores the adapter converted to plain LoRA (rank 2r) against the original base.
# EVA: A from the SVD of each layer's inputs on training examples (a data pass), ranks redistributed across
# layers by explained variance, a layer getting up to rho * r (eva: PEFT's rho 2; eva_rho_R: rho R, from 1, no
# redistribution, to 16). LoftQ: A and B fit what 4-bit quantization took from the base weights (needs
# model.quantize bits 4, and a CUDA device: PEFT computes it there only).
INITS = ("default", "gaussian", "pissa", "olora", "eva", "loftq")
EVA_RHO = re.compile(r"eva_rho_([0-9]{1,2}(?:\.[0-9]{1,2})?)")
MAX_EVA_RHO = 16.0


def eva_rho(init: str) -> float | None:
    """EVA's rho for a `lora.init` value (2, PEFT's default, for plain eva), None when it is not EVA."""
    if init == "eva":
        return 2.0
    m = EVA_RHO.fullmatch(init)
    return float(m.group(1)) if m else None


def pattern_regex(key: str) -> "re.Pattern[str]":
    """A rank_pattern/alpha_pattern key as PEFT matches it (peft.utils.other.get_pattern_key): the key at the
    end of a module's full name, after a dot or alone."""
    return re.compile(rf"(.*\.)?({key})$")


def lora_variant_defaults() -> dict[str, Any]:
    """The variants' defaults, for views that compare runs knob by knob (a stored run leaves them out)."""
    return {k: LoraSpec.model_fields[k].default for k in VARIANTS}


class LoraSpec(_Strict):
    """PEFT LoraConfig knobs."""

    r: int = Field(8, gt=0, le=4096, description="LoRA rank")
    # alpha = 2r when unset: common practice, keeps the update scale alpha/r = 2 as r changes.
    alpha: float | None = Field(None, gt=0, description="lora_alpha; default 2 * r")
    dropout: float = Field(0.05, ge=0, lt=1, description="lora_dropout")
    # `query_key_value` is GPT-NeoX naming; models without it get their own q/k/v projections.
    target_modules: list[str] = Field(default_factory=lambda: ["query_key_value"], min_length=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    # Variants (off by default). rsLoRA scales the update by alpha/sqrt(r) instead of alpha/r, so a larger
    # rank is not a smaller update; DoRA learns a magnitude per output and the direction with LoRA;
    # LoRA+ trains B with a learning rate `loraplus_lr_ratio` times A's (its paper suggests 2-16).
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: float | None = Field(None, ge=1, le=1024, description="B's learning rate / A's (LoRA+)")
    # Where the adapters go beyond the module names: which blocks (0-based indices), and per-module
    # ranks and alphas (PEFT's rank_pattern / alpha_pattern: a module name or regex -> value).
    layers: list[Annotated[int, Field(ge=0, le=10_000)]] | None = Field(None, min_length=1)
    rank_pattern: dict[str, Annotated[int, Field(gt=0, le=4096)]] | None = None
    alpha_pattern: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = None
    init: str = Field("default", description="default, gaussian, pissa, pissa_niter_N (fast SVD), olora, eva, "
                                             "eva_rho_R, loftq")

    @field_validator("init")
    @classmethod
    def _known_init(cls, v: str) -> str:
        if v in INITS or re.fullmatch(r"pissa_niter_[1-9][0-9]{0,2}", v):
            return v
        rho = eva_rho(v)
        if rho is not None and 1 <= rho <= MAX_EVA_RHO:  # one spelling per rho: one adapter id
            return "eva" if rho == 2 else f"eva_rho_{rho:g}"
        if rho is not None:
            raise ValueError(f"EVA's rho must be from 1 (no rank moves between layers) to {MAX_EVA_RHO:g}, got {rho:g}; "
                             "fix: use e.g. eva_rho_1, or eva (rho 2)")
        raise ValueError(f"unknown init {str(v)[:40]!r}; fix: use one of {', '.join(INITS)}, pissa_niter_N "
                         "(N power iterations, e.g. pissa_niter_4: a fast SVD), or eva_rho_R (EVA with rho R, "
                         "e.g. eva_rho_1: no rank moves between layers)")

    @model_serializer(mode="wrap")
    def _variants_only_when_used(self, handler):
        """A variant at its default is left out of the dump, so every run's stored settings, and the
        adapter id that hashes them, stay what they were before the variants existed."""
        out = handler(self)
        for key in VARIANTS:
            if key in out and out[key] == LoraSpec.model_fields[key].default:
                del out[key]
        return out

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _pattern_keys_are_regexes(cls, v: dict | None) -> dict | None:
        """PEFT matches each key as a regular expression against the end of a module's name; a key that does
        not compile failed only at training time, with a bare re.error."""
        for key in v or {}:
            try:
                re.compile(key)  # its own error first: positions then count in the key, not in PEFT's wrapper
                pattern_regex(key)
            except re.error as err:
                raise ValueError(f"key {key[:60]!r} is not a regular expression PEFT can match ({err}); fix: write "
                                 "a module name (v_proj) or a valid regex (layers\\.0\\.self_attn\\.v_proj), escaping "
                                 "[ ] ( ) . * + ? with a backslash where you mean them literally") from None
        return v

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
    # Save the whole training state (adapter, optimizer, scheduler, RNG, data position) every N optimizer
    # steps, or every "Nm" minutes of training, so the same command after a kill continues from there.
    # 5m: a run killed late loses at most 5 minutes, and a run shorter than that never pays for one.
    # null: never. Left out of every dump (run and adapter ids): it changes nothing that is trained.
    checkpoint_every: int | str | None = Field("5m", exclude=True)

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _steps_or_minutes(cls, v: Any) -> Any:
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        if isinstance(v, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*m(in)?\s*", v) and float(re.sub(r"[^0-9.]", "", v)) > 0:
            return v.strip()
        raise ValueError(f"checkpoint_every must be a number of steps (e.g. 500) or of minutes (e.g. \"10m\"), "
                         f"got {str(v)[:40]!r}; fix: write 500, \"10m\", or null for no checkpoints")

    @property
    def checkpoint_steps(self) -> int | None:
        """checkpoint_every as steps (None: by time, or never)."""
        return self.checkpoint_every if isinstance(self.checkpoint_every, int) else None

    @property
    def checkpoint_seconds(self) -> float | None:
        """checkpoint_every as seconds of training (None: by steps, or never)."""
        if not isinstance(self.checkpoint_every, str):
            return None
        return 60.0 * float(re.sub(r"[^0-9.]", "", self.checkpoint_every))

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
    # Rows without the instruction field may be chat conversations (a list of {role, content}, the last
    # an assistant answer) or raw text (learned whole, evaluated as a continuation).
    messages_field: str = "messages"
    text_field: str = "text"
    system_prompt: str | None = None  # None: the chat template's own default
    # Related eval items (paraphrases, parts of one document) are not independent: name the row field that
    # groups them, and intervals count each group once (cluster-robust, df = groups - 1).
    group_field: str | None = Field(None, description="field naming each row's group of related eval items")
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


class QuantizeSpec(_Strict):
    """QLoRA: the frozen base model held in 4 or 8 bits (bitsandbytes); the adapter trains at full
    precision on top of it. Less memory for the base, some quality for it."""

    bits: Literal[4, 8]
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit only: NormalFloat4 (QLoRA's) or FP4")
    double_quant: bool = Field(True, description="4-bit only: quantize the quantization constants too")


class ModelSpec(_Strict):
    """A base model: `builtin:smollm2-135m`, a Hugging Face id, a local folder, or a .gguf file."""

    name: str = BUILTIN_MODEL
    revision: str | None = None
    # Off unless asked: a hub repo's own Python code would run on this machine.
    trust_remote_code: bool = False
    quantize: QuantizeSpec | None = None


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


def cost_of(seconds: float, per_hour: float) -> float:
    """What `seconds` of compute cost at `per_hour`: the one conversion of time into money (a run's cost,
    a sweep's money budget and what is left of it, the report's compute)."""
    return seconds / 3600 * per_hour


# Evaluation settings that change how results are read, not what is measured: left out of run ids, so
# changing them reuses every stored run.
ANALYSIS_ONLY = {"confidence", "bootstrap_resamples", "min_effect", "sequential"}


class SequentialSpec(_Strict):
    """`repeats: auto`: seeds planned as the data come in (execute.plan). Every run starts with
    `min_seeds`; a run whose verdicts against base and against the reference run are still unsettled on
    `metrics` gets one more seed, up to `max_seeds`. Each possible look spends part of the error rate
    (docs/statistics.md), so stopping when the data look settled does not inflate false calls."""

    # 2: the fewest seeds that measure seed noise at all; 5: where a sixth seed rarely changes a call.
    min_seeds: int = Field(2, ge=2, le=20)
    max_seeds: int = Field(5, ge=2, le=100)
    metrics: list[str] = Field(default_factory=lambda: ["eval_loss"], min_length=1,
                               description="the metrics whose verdicts decide whether a run needs more seeds")

    @field_validator("metrics")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from loralab.metrics.table import metric_bases

        known = metric_bases()
        for key in v:
            if key.partition("@")[0] not in known:
                raise ValueError(f"repeats.metrics names no stored metric: {str(key)[:40]!r}; use one of: "
                                 f"{', '.join(sorted(known))}")
        return v

    @model_validator(mode="after")
    def _order(self) -> "SequentialSpec":
        if self.max_seeds < self.min_seeds:
            raise ValueError(f"repeats: max ({self.max_seeds}) is below min ({self.min_seeds}); fix: give a max of at "
                             f"least {self.min_seeds}, or lower min")
        return self


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
    bootstrap_resamples: int = Field(5000, ge=100, le=100_000)  # unused since the intervals are analytic: kept so old files load (validate says so)
    # The smallest difference worth acting on, per metric (in its own unit; a share such as exact_match
    # as a fraction: 0.02 is 2 points). An interval inside (-floor, +floor) reads "negligible".
    min_effect: dict[str, float] = Field(default_factory=dict)
    # Set by `repeats: auto` (not written here): the seed plan whose looks the verdicts are adjusted for.
    sequential: SequentialSpec | None = None

    @field_validator("min_effect")
    @classmethod
    def _known_metrics(cls, v: dict[str, float]) -> dict[str, float]:
        from loralab.metrics.table import metric_bases

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
        from loralab.metrics.table import better_of

        return self.direction or ("maximize" if better_of(self.metric) == "higher" else "minimize")


class PrunerSpec(_Strict):
    """Stop trials that are clearly worse than the others, judged by held-out loss every `every` steps."""

    name: Literal["median", "successive_halving", "hyperband", "none"] = "median"
    every: int = Field(10, gt=0, description="optimizer steps between intermediate eval losses")
    # Median: no trial is pruned until this many have finished, so the median means something.
    startup_trials: int = Field(2, ge=0)
    warmup_steps: int = Field(0, ge=0, description="no pruning before this step")
    # Successive halving / Hyperband: N at the first rung, reduction_factor times more at each later one
    # (as many trials x examples per rung; the close calls among the last trials made on many examples).
    eval_examples: int | None = Field(None, gt=0, description="intermediate loss on the first N eval examples (cheaper); "
                                      "successive_halving/hyperband: at the first rung, reduction_factor x more at each later one")
    reduction_factor: int | None = Field(None, ge=2, description="successive_halving / hyperband: keep 1 in this many "
                                         "trials per rung (default: Optuna's, 4 and 3)")
    # successive_halving with one worker: every trial of a bracket trains to a rung, then the best 1 in
    # reduction_factor continue from where they paused (a checkpoint) and the rest stop: no trial trains
    # on before its rivals reached the rung. false (or several workers, or a database server): Optuna's
    # asynchronous pruner, which judges each trial against those that reached the rung before it.
    synchronous: bool = True

    @property
    def resolved_reduction_factor(self) -> int:
        return self.reduction_factor or (3 if self.name == "hyperband" else 4)


class BudgetSpec(_Strict):
    """When the sweep stops: whichever limit is reached first (checked between trials)."""

    trials: int | None = Field(None, gt=0)
    minutes: float | None = Field(None, gt=0)
    money: float | None = Field(None, gt=0, description="in the currency of `cost:`, at cost.per_hour")


class ConfirmSpec(_Strict):
    """The winner's curse: the best of many trials is partly the luckiest, so its searched value is
    optimistic. The `top` trials are trained again on `seeds` fresh seeds (never used by the search) and
    the best is announced by its confirmed value, the searched one beside it. `top: 0` turns it off."""

    top: int = Field(1, ge=0, le=20)
    seeds: int = Field(2, ge=1, le=20)  # 2: the fewest that give the confirmed value an interval


# Fresh seeds of a confirmation start here (train.seed + 1000, +1001, ...): far from the search's own.
CONFIRM_SEED_OFFSET = 1000


# `space: auto`, each choice with its evidence (docs/priors.md has the citations):
# - learning rate: LoRA's best is about 10x full fine-tuning's and roughly independent of rank ("LoRA
#   Without Regret", Thinking Machines 2025): a log range around 10x the usual full fine-tuning rates;
# - alpha tied to r (alpha = 2r), so the update scale alpha/r stays as r changes (Hu et al. 2021);
# - every linear layer, the MLP's too: attention-only LoRA underperforms (LoRA Without Regret;
#   Biderman et al. 2024, "LoRA Learns Less and Forgets Less");
# - rank: a few values, since with small data rank matters less than the learning rate.
PRIOR_SPACE: dict[str, dict] = {
    "train.learning_rate": {"low": 1.0e-4, "high": 2.0e-3, "log": True},
    "lora.r": {"values": [8, 16, 32]},
    "lora.alpha": {"ratio_of": "lora.r", "values": [2]},
    "lora.target_modules": {"values": ["all-linear"]},
}
PRIOR_REASONS = {
    "train.learning_rate": "LoRA's best learning rate is about 10x full fine-tuning's and hardly depends on the rank "
                           "(LoRA Without Regret, 2025): searched on a log scale from 1e-4 to 2e-3",
    "lora.r": "with small data the rank matters less than the learning rate: three values, 8 to 32",
    "lora.alpha": "tied to r (alpha = 2r), so the update scale alpha/r stays as r changes (Hu et al. 2021)",
    "lora.target_modules": "every linear layer, the MLP's too: attention-only LoRA trails full fine-tuning (LoRA Without "
                           "Regret; Biderman et al. 2024)",
}


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
    confirm: ConfirmSpec = Field(default_factory=ConfirmSpec)

    @field_validator("objective", mode="before")
    @classmethod
    def _one_objective_is_a_list(cls, v: Any) -> Any:
        return v if isinstance(v, list) else [v]

    @field_validator("space", mode="before")
    @classmethod
    def _auto_space(cls, v: Any) -> Any:
        """`space: auto`: the space published evidence proposes (PRIOR_SPACE; docs/priors.md)."""
        if v == "auto":
            return {k: dict(knob) for k, knob in PRIOR_SPACE.items()}
        return v

    @property
    def from_priors(self) -> bool:
        return {k: v.model_dump(exclude_defaults=True) for k, v in self.space.items()} == \
            {k: KnobSpec.model_validate(v).model_dump(exclude_defaults=True) for k, v in PRIOR_SPACE.items()}

    @property
    def directions(self) -> list[str]:
        return [o.resolved_direction for o in self.objective]

    @property
    def resolved_pruner(self) -> PrunerSpec:
        # Optuna prunes only single-objective studies (Trial.report raises otherwise).
        return self.pruner or PrunerSpec(name="median" if len(self.objective) == 1 else "none")


# What ray.init connects to: HOST:PORT (a hostname, IPv4 or [IPv6]; as `ray start --head` prints it),
# ray://HOST[:PORT] (Ray Client), auto (the cluster this machine belongs to) or local
_HOST = r"(?:[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]+\])"
RAY_ADDRESS = re.compile(rf"auto|local|ray://{_HOST}(?::(?P<cport>\d{{1,5}}))?|{_HOST}:(?P<port>\d{{1,5}})")


class ExecutorSpec(_Strict):
    """Where trials train: in this process (`local`, the default), or on Ray actors (`ray`), each of
    which loads the base model once and takes jobs; Ray places one actor per `gpus_per_trial` GPUs."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="a Ray cluster (`ray start --head` prints it); none: a local Ray instance")
    actors: int | None = Field(None, ge=1, le=1024, description="how many; none: as many as the cluster's resources fit")
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0, description="0 on a CPU machine; 1: one trial per GPU; 0.5: two per GPU")

    @field_validator("address")
    @classmethod
    def _address_form(cls, v: str | None) -> str | None:
        m = RAY_ADDRESS.fullmatch(v) if v is not None else None
        if v is not None and (m is None or not 0 < int(m["port"] or m["cport"] or 1) < 65536):
            raise ValueError(f"{v[:80]!r} is not a Ray address: write HOST:PORT (as `ray start --head` prints it), "
                             "ray://HOST:PORT, or auto")
        return v

    @model_validator(mode="after")
    def _ray_only(self) -> "ExecutorSpec":
        if self.kind == "local" and (self.address or self.actors or self.gpus_per_trial):
            raise ValueError("address, actors and gpus_per_trial are Ray's: set kind: ray, or leave them out")
        return self


class MlflowTrack(_Strict):
    tracking_uri: str | None = Field(None, description="default: MLflow's own (MLFLOW_TRACKING_URI, else ./mlflow.db)")
    experiment: str | None = Field(None, description="the MLflow experiment; default: the file's `name`")


class TensorboardTrack(_Strict):
    log_dir: str | None = Field(None, description="default: WORKSPACE/tensorboard; one folder per run under EXPERIMENT/")


class WandbTrack(_Strict):
    project: str = Field("loralab", description="the W&B project; runs are grouped by the file's `name`")
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = Field(None, description="default: W&B's own (WANDB_MODE)")


class TrackSpec(_Strict):
    """Copies of each run in experiment trackers (the workspace stays the source of truth):
    `track: [mlflow, tensorboard, wandb]`, or a mapping of tracker to its options."""

    mlflow: MlflowTrack | None = None
    tensorboard: TensorboardTrack | None = None
    wandb: WandbTrack | None = None

    @model_validator(mode="before")
    @classmethod
    def _names_as_a_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            names = [str(x) for x in v]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"{', '.join(twice)} listed twice; fix: name each tracker once")
            return {n: {} for n in names}
        if isinstance(v, dict):  # `mlflow:` with no options
            return {k: ({} if o is None else o) for k, o in v.items()}
        return v

    @property
    def names(self) -> list[str]:
        return [n for n in TRACKERS if getattr(self, n) is not None]


# The tracker names, from TrackSpec's fields (one per tracker, its options its model); each an optional
# extra, pip install 'loralab[NAME]', registered under the same name in loralab.track (a test checks).
TRACKERS = tuple(TrackSpec.model_fields)


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
    # A folder (SQLite, the default ./loralab-workspace) or postgresql://USER:PW@HOST:5432/DB shared by many hosts.
    workspace: str | None = None
    # With a database workspace: the folder for adapters, the same path on every host (a shared disk).
    artifacts: str | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    runs: dict[str, Defaults] = Field(default_factory=dict)
    # Each run is trained once per seed; metrics are then reported as mean and confidence interval.
    repeats: int = Field(1, ge=1, le=100)
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(None, min_length=1, max_length=100)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    cost: CostSpec | None = None
    sweep: SweepSpec | None = None
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    track: TrackSpec = Field(default_factory=TrackSpec)
    # Filled by load_experiment, not by the file.
    resolved_runs: list[RunSpec] = Field(default_factory=list, exclude=True)
    source: str | None = Field(None, exclude=True)

    @field_validator("model", mode="before")
    @classmethod
    def _model_as_string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _adaptive_repeats(cls, v: Any) -> Any:
        """`repeats: auto` or `repeats: {min, max, metrics}`: start with `min` seeds and let the planner
        add seeds where verdicts are unsettled (SequentialSpec); `repeats` then counts the first round."""
        if not isinstance(v, dict):
            return v
        rep = v.get("repeats")
        if rep == "auto" or isinstance(rep, dict):
            plan = {} if rep == "auto" else {{"min": "min_seeds", "max": "max_seeds"}.get(k, k): x for k, x in rep.items()}
            ev = v.get("evaluation")
            ev = dict(ev) if isinstance(ev, dict) else ({} if ev is None else ev)
            if isinstance(ev, dict):
                ev["sequential"] = plan
            first = plan.get("min_seeds", 2)
            v = {**v, "repeats": first if isinstance(first, int) and not isinstance(first, bool) else 2, "evaluation": ev}
        return v

    @property
    def adaptive(self) -> "SequentialSpec | None":
        """The seed plan of `repeats: auto`, or None for a fixed number of seeds."""
        return self.evaluation.sequential

    @model_validator(mode="after")
    def _seeds_match_repeats(self) -> "Experiment":
        if self.seeds is not None and self.adaptive is not None:
            raise ValueError("repeats: auto picks its own seeds (train.seed, +1, ...): drop `seeds:` or give a number of repeats")
        if self.seeds is not None:
            if "repeats" in self.model_fields_set and self.repeats != len(self.seeds):
                raise ValueError(f"repeats is {self.repeats} but {len(self.seeds)} seeds are listed: give one of them")
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError("seeds must be different from each other")
        return self

    def seeds_for(self, run: "RunSpec", count: int | None = None) -> list[int]:
        """The seeds a run is trained with: `seeds`, else `repeats` (or `count`) seeds counting up from
        train.seed. With `repeats: auto` that is the first round; the planner asks for more by `count`."""
        if self.seeds is not None:
            return list(self.seeds)
        return [run.train.seed + i for i in range(self.repeats if count is None else count)]

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


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


_TOPICS: dict[str, type[BaseModel]] = {"lora": LoraSpec, "train": TrainSpec, "generate": GenerateSpec}


def config_hash(obj: Any) -> str:
    """Stable short hash of JSON-able data (run ids, fingerprints)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
