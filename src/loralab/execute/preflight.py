"""Checks that need the data and the model's shape, shared by `validate` and `run`: whatever validate
passes must not fail later for a reason it could have seen (a plan that cannot finish, a rank above
the layer width, a cap beyond the model's context, an example longer than max_seq_len).

Cheap by design: plain arithmetic on the resolved runs, the number of training examples and what
`models.ModelLayers` records of the model (read from its config, no weights loaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loralab.errors import Problem, SpecError
from loralab.config.schema import Experiment, RunSpec, pattern_regex

# A plan above this many optimizer steps is a typo (epochs: 1e12), not an experiment: a million
# steps of even a tiny model take days.
MAX_PLANNED_STEPS = 1_000_000


def _where(exp: Experiment, run: RunSpec, section: str, name: str) -> str:
    """Where a run's setting comes from: the sweep knob, the run's own entry, or the defaults."""
    if run.name.startswith("trial") and exp.sweep and f"{section}.{name}" in exp.sweep.space:
        return f"sweep.space.{section}.{name}"
    if run.name in exp.runs:
        return f"runs.{run.name}.{section}.{name}"
    return f"defaults.{section}.{name}"


def checked_runs(exp: Experiment, runs: list[RunSpec]) -> list[RunSpec]:
    """The runs to check: those given, and a sweep's trials at the edges of its space."""
    out = list(runs)
    if exp.sweep is not None:
        from loralab.config.space import Space, experiment_start, make_run

        start = experiment_start(exp)
        out += [make_run(start, pt, f"trial{i}") for i, pt in enumerate(Space(exp.sweep).corners())]
    return out


def unfinishable(exp: Experiment, runs: list[RunSpec], n_train: int, layers: Any | None) -> list[Problem]:
    """Plans that cannot finish or cannot mean what they say; `layers` (models.ModelLayers) or None
    when the model is not on disk yet (then only the step counts are checked)."""
    from loralab.engine.models import resolve_target_modules

    out: list[Problem] = []
    seen: set[str] = set()

    def add(where: str, message: str, value: Any, fix: str) -> None:
        if where not in seen:
            seen.add(where)
            out.append(Problem(where, message, value, fix))

    context = layers.context if layers is not None else None
    for run in checked_runs(exp, runs):
        t = run.train
        steps = t.planned_steps(n_train)
        if steps > MAX_PLANNED_STEPS:
            field = "max_steps" if t.max_steps else "epochs"
            add(_where(exp, run, "train", field), f"plans {steps:,} optimizer steps ({n_train} training examples, "
                f"batch {t.batch_size} x {t.gradient_accumulation}): more than {MAX_PLANNED_STEPS:,}, days of training",
                t.max_steps or t.epochs, "lower it; set train.max_steps to say exactly how many steps to train")
        if t.warmup_steps > steps:
            add(_where(exp, run, "train", "warmup_steps"), f"above the {steps} planned steps: the learning rate would "
                f"never reach {t.learning_rate:g}", t.warmup_steps, f"use at most {steps}, or warmup_ratio (a share of the steps)")
        if context is not None:
            for cap in run.generate.max_new_tokens:
                if cap > context:
                    add(_where(exp, run, "generate", "max_new_tokens"), f"above the model's context of {context} tokens",
                        cap, f"use at most {context} (prompt and answer share the context)")
            if t.max_seq_len > context:
                add(_where(exp, run, "train", "max_seq_len"), f"above the model's context of {context} tokens", t.max_seq_len,
                    f"use at most {context}")
        if layers is not None and layers.widths:
            try:
                targets, _ = resolve_target_modules(layers, run.lora.target_modules)
            except Exception:  # an unknown target: reported by the target check itself
                targets = []
            names = [n for n in layers.widths if n not in ("lm_head", "embed_out")] if targets == "all-linear" else targets
            widths = [layers.widths[n] for n in names if n in layers.widths]
            if widths and run.lora.r > min(widths):
                add(_where(exp, run, "lora", "r"), f"above the width {min(widths)} of the targeted layers (a rank beyond "
                    "it adds parameters, not capacity)", run.lora.r, f"use at most {min(widths)}")
        _pattern_problems(exp, run, layers, add)
        _init_fit_problems(exp, run, layers, n_train, add)
        blocks = _blocks(layers)
        if blocks and run.lora.layers and max(run.lora.layers) >= blocks:
            add(_where(exp, run, "lora", "layers"), f"the model has {blocks} blocks (0 to {blocks - 1})",
                run.lora.layers, f"use block indices from 0 to {blocks - 1}")
    ev = exp.evaluation
    if context is not None and ev.drift and ev.drift_max_new_tokens > context:
        add("evaluation.drift_max_new_tokens", f"above the model's context of {context} tokens", ev.drift_max_new_tokens,
            f"use at most {context}")
    return out


def _pattern_problems(exp: Experiment, run: RunSpec, layers: Any | None, add) -> None:
    """rank_pattern / alpha_pattern keys that match no adapted layer, and pattern ranks above a layer's width."""
    if not (layers is not None and layers.params and (run.lora.rank_pattern or run.lora.alpha_pattern)):
        return
    adapted = _adapted_modules(layers, run)
    for knob in ("rank_pattern", "alpha_pattern"):
        idle = [k for k in getattr(run.lora, knob) or {} if not any(pattern_regex(k).match(m) for m in adapted)]
        if idle and adapted:
            example = adapted[0]
            add(_where(exp, run, "lora", knob), f"{'key' if len(idle) == 1 else 'keys'} "
                f"{', '.join(repr(k) for k in idle)} {'matches' if len(idle) == 1 else 'match'} none of the "
                f"{len(adapted)} layers LoRA is put on (e.g. {example}): the setting would be stored but not "
                "applied", idle[0] if len(idle) == 1 else idle,
                f"name a targeted layer by its name ({example.rsplit('.', 1)[-1]}) or the end of its path "
                f"({'.'.join(example.split('.')[-4:])}), or remove the key")
    for key, rank in (run.lora.rank_pattern or {}).items():  # as PEFT picks: the first key that matches
        shapes = [layers.params[m + ".weight"] for m in adapted
                  if next((k for k in run.lora.rank_pattern if pattern_regex(k).match(m)), None) == key]
        widths = [min(s) for s in shapes if len(s) == 2 and s[-1] > 1]
        if widths and rank > min(widths):
            add(_where(exp, run, "lora", "rank_pattern"), f"key {key!r}: rank {rank} is above the width "
                f"{min(widths)} of the layers it matches (a rank beyond it adds parameters, not capacity)", rank,
                f"use at most {min(widths)}")


def _init_fit_problems(exp: Experiment, run: RunSpec, layers: Any | None, n_train: int, add) -> None:
    """What the run's initialisation refuses seeing the data's size and the layers' shapes (EVA's)."""
    from loralab.engine.inits import resolve_init

    adapted = _adapted_modules(layers, run) if layers and layers.params else []
    shapes = layers.params if layers and layers.params else {}
    for p in resolve_init(run.lora.init).check_fit(_init_check(exp, run), adapted, shapes, n_train):
        add(p.where, p.message, p.value, p.fix)


def _init_check(exp: Experiment, run: RunSpec):
    from loralab.engine.inits import InitCheck

    bits = exp.model.quantize.bits if exp.model.quantize is not None else None
    return InitCheck(run, lambda knob: _where(exp, run, "lora", knob), bits, exp.device, lambda: _trains_on_cpu(exp))


def init_problems(exp: Experiment, runs: list[RunSpec]) -> list[Problem]:
    """Initialisations and variants this model, device or variant cannot take: each lora.init's own refusals
    (its strategy's `check`, engine.inits: PiSSA and OLoRA need a full-precision base, LoftQ a 4-bit base on
    CUDA without DoRA), and DoRA on an 8-bit base, which needs CUDA."""
    from loralab.engine.inits import resolve_init

    out: list[Problem] = []
    bits = exp.model.quantize.bits if exp.model.quantize is not None else None
    for run in checked_runs(exp, runs):
        out += resolve_init(run.lora.init).check(_init_check(exp, run))  # the table's refusals (engine.inits)
        if bits == 8 and run.lora.use_dora and _trains_on_cpu(exp):
            from importlib.metadata import version

            out.append(Problem(_where(exp, run, "lora", "use_dora"), f"DoRA on an 8-bit base fails on a CPU: PEFT "
                               f"{version('peft')} dequantizes each layer by swapping in a copy of its weight without "
                               f"its 8-bit scales, and the layer's next forward fails (device: {exp.device})", True,
                               "use model.quantize bits: 4 for DoRA on a CPU, remove use_dora, or run where a CUDA "
                               "GPU is visible"))
    return list({(p.where, p.message): p for p in out}.values())  # a default shared by runs: said once


def _trains_on_cpu(exp: Experiment) -> bool:
    if exp.device != "auto":
        return exp.device == "cpu"
    import torch

    return not torch.cuda.is_available()


def gguf_problems(exp: Experiment, runs: list[RunSpec]) -> list[Problem]:
    """`lora.layers` beyond a GGUF model's blocks (a user's .gguf, the built-in model), read from its header:
    before the file is converted, not after (the conversion is the slow part of a first run: 33 s for 135M)."""
    from loralab.config.schema import BUILTIN_MODEL
    from loralab.engine.models import builtin_gguf_path, gguf_blocks, gguf_file
    from loralab.errors import ModelError

    if not any(r.lora.layers for r in checked_runs(exp, runs)):
        return []
    gguf = gguf_file(exp.model, exp.base_dir)
    if gguf is None and exp.model.name == BUILTIN_MODEL:  # the built-in model is a GGUF too until converted
        try:
            gguf = builtin_gguf_path()
        except ModelError:  # not installed: said by the model check
            gguf = None
    blocks = gguf_blocks(gguf) if gguf is not None else None
    out: list[Problem] = []
    for run in checked_runs(exp, runs) if blocks else []:
        if run.lora.layers and max(run.lora.layers) >= blocks:
            out.append(Problem(_where(exp, run, "lora", "layers"), f"the model has {blocks} blocks (0 to {blocks - 1}), "
                               f"by its GGUF header", run.lora.layers, f"use block indices from 0 to {blocks - 1}"))
    return list({p.where: p for p in out}.values())


def check_inits(exp: Experiment, runs: list[RunSpec] | None = None) -> None:
    """Checked before any data or model is read (validate and run): initialisations the setup cannot take,
    and block indices beyond a GGUF model's header."""
    runs = exp.resolved_runs if runs is None else runs
    problems = init_problems(exp, runs) + gguf_problems(exp, runs)
    if problems:
        n = len(problems)
        raise SpecError(f"{exp.source or 'experiment'}: {n} LoRA setting{'s' if n > 1 else ''} this setup "
                        "cannot run", problems)


def check_before_reading(exp: Experiment, runs: list[RunSpec] | None = None, where: str | Path | None = None) -> None:
    """The checks that read neither data nor model, in the one order validate and prepare (run, sweep)
    both follow: LoRA settings this setup cannot run (check_inits), then the data files the experiment
    names (every missing one in one error). `where`: the file the error names (default: exp.source)."""
    from loralab.config.loading import check_data_paths

    check_inits(exp, runs)  # needs no data: checked even when the data is read only at training time
    problems = check_data_paths(exp)
    if problems:
        raise SpecError(f"{where or exp.source or 'experiment'}: data file missing", problems)


def _adapted_modules(layers: Any, run: RunSpec) -> list[str]:
    """Full names of the modules a run's LoRA goes on (its target layers, in its `layers` blocks): what PEFT
    matches rank_pattern and alpha_pattern keys against. [] when the targets do not resolve (reported
    by the target check itself)."""
    import re

    from loralab.engine.models import resolve_target_modules

    try:
        targets, _ = resolve_target_modules(layers, run.lora.target_modules)
    except Exception:
        return []
    if targets == "all-linear":
        targets = [n for n in (layers.widths or {}) if n not in ("lm_head", "embed_out")]
    out = []
    for name in layers.params:
        module, _, kind = name.rpartition(".")
        if kind != "weight" or module.rsplit(".", 1)[-1] not in targets:
            continue
        block = re.search(r"\.(\d+)\.", module)
        if run.lora.layers and (block is None or int(block.group(1)) not in run.lora.layers):
            continue
        out.append(module)
    return out


def _blocks(layers: Any | None) -> int | None:
    """How many repeated blocks the model has, read off its parameter names (`...layers.11.mlp...`)."""
    if layers is None or not layers.params:
        return None
    import re

    found = [int(m.group(1)) for name in layers.params for m in [re.search(r"\.(\d+)\.", name)] if m]
    return max(found) + 1 if found else None


def check_plan(exp: Experiment, runs: list[RunSpec], n_train: int, layers: Any | None) -> None:
    problems = unfinishable(exp, runs, n_train, layers)
    if problems:
        n = len(problems)
        raise SpecError(f"{exp.source or 'experiment'}: {n} plan{'s' if n > 1 else ''} that cannot run as written", problems)


def shortest_max_seq_len(exp: Experiment, runs: list[RunSpec]) -> tuple[int, str]:
    """The smallest max_seq_len any run (or sweep trial) will train with, and where it is set."""
    from loralab.config.schema import TrainSpec

    options = [(r.train.max_seq_len, "defaults.train.max_seq_len" if r.name not in exp.runs
                else f"runs.{r.name}.train.max_seq_len") for r in runs]
    knob = exp.sweep.space.get("train.max_seq_len") if exp.sweep else None
    if knob is not None:
        low = min(v for v in knob.values if isinstance(v, (int, float))) if knob.values else knob.low
        if low is not None:
            options.append((int(low), "sweep.space.train.max_seq_len"))
    return min(options) if options else (TrainSpec().max_seq_len, "train.max_seq_len")


def _lengths_file(model_folder: Path, dataset) -> Path:
    from loralab.engine.models import _folder_fingerprint, cache_dir

    return cache_dir() / "lengths" / f"{_folder_fingerprint(model_folder)}-{dataset.fingerprint}.json"


def cached_lengths(model_folder: Path, dataset) -> list[int] | None:
    """Example token lengths recorded for this model folder and data, so validate need not load a tokenizer."""
    try:
        lengths = json.loads(_lengths_file(model_folder, dataset).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(lengths, list) and len(lengths) == len(dataset.train) + len(dataset.eval)
    return lengths if ok and all(isinstance(n, int) for n in lengths) else None


def remember_lengths(model_folder: Path, dataset, lengths: list[int]) -> None:
    """Best effort: a read-only cache only costs speed."""
    try:
        path = _lengths_file(model_folder, dataset)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(lengths))
        os.replace(tmp, path)
    except OSError:
        pass


def lengths_for(model_folder: Path, dataset, tokenizer_loader) -> list[int]:
    """Token lengths of every example: recorded, else measured with the tokenizer (and recorded)."""
    from loralab.engine.data import example_lengths

    lengths = cached_lengths(model_folder, dataset)
    if lengths is None:
        lengths = example_lengths(tokenizer_loader(), dataset)
        remember_lengths(model_folder, dataset, lengths)
    return lengths
