"""One strategy per `lora.init`, chosen from one table (`INIT_METHODS`, `resolve_init`), in the style of
PEFT's LoraVariant / resolve_lora_variant. Each says what PEFT is given (`peft_init`), what it needs before
the adapter exists (`prepare`: EVA's batches, LoftQ's weights folder, the base weights PiSSA/OLoRA rewrite),
what it does once PEFT made the adapter (`apply`), how the trained adapter is saved (`save_converted`, only
where the base was rewritten), what it puts back on the base (`restore`) and which setups it refuses
(`check`, `check_fit`: what validate and run say).

The accepted spellings (INITS, pissa_niter_N, eva_rho_R) stay in config.schema: the experiment file's
schema is checked without torch and below the engine (config.schema may not import engine modules).

EVA and LoftQ set the adapter in place and leave the base weights as they were; PiSSA and OLoRA move
the adapter's start out of the base weights, which are put back when the adapter goes, and the trained
adapter is stored converted to a plain LoRA on the original base. Torch is imported where it is used,
so `validate` reads this table without it."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import warnings

from loralab.errors import Problem
from loralab.config.schema import INITS, RunSpec, eva_rho, pattern_regex

# EVA fits the top r*rho right-singular vectors of each layer's inputs, over the answer tokens (PEFT's label
# mask). 8 examples a batch: about 100 answer tokens on the built-in data, above the 16 components of r = 8,
# rho = 2 (a batch with fewer tokens than components is skipped by PEFT).
EVA_BATCH = 8
EVA_BATCHES = 16  # distinct batches: the first 128 training examples, cycled until the SVD has converged
# PEFT cycles the batches until every layer's components have settled (cosine similarity >= tau), with no
# limit of its own. The built-in model (r = 8, q/k/v) settles in 27 passes; a run that does not settle in this
# many fails with a message instead of looping.
EVA_MAX_PASSES = 100


# PEFT warns, when a PiSSA/OLoRA config has rsLoRA with rank/alpha patterns, that its own conversion cannot
# store the adapter; save_converted does (alpha x sqrt 2 at rank 2r), so the warning would only mislead.
warnings.filterwarnings("ignore", message="Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training")


class EvaDidNotConverge(RuntimeError):
    pass


def eva_batches(examples: Sequence, pad_id: int, device) -> list[dict[str, "torch.Tensor"]]:
    """Right-padded batches (input_ids, attention_mask, labels with -100 over prompts and padding): what
    PEFT's EVA expects; the labels keep the SVD to the answer tokens, as training's loss is."""
    from loralab.engine.train import collate

    use = list(examples[:EVA_BATCH * EVA_BATCHES])
    return [collate(use[i:i + EVA_BATCH], pad_id, device) for i in range(0, len(use), EVA_BATCH)]


def eva_init(model, batches: list[dict[str, "torch.Tensor"]], adapter: str = "default") -> None:
    """EVA (PEFT's initialize_lora_eva_weights) on a PEFT model made with init_lora_weights="eva": A from
    the SVD of each layer's inputs, ranks redistributed by explained variance (the adapter config's
    rank_pattern and alpha_pattern say where they went)."""
    from peft import initialize_lora_eva_weights

    passes = 0

    def forward(m, inputs):
        nonlocal passes
        passes += 1
        if passes > EVA_MAX_PASSES:
            raise EvaDidNotConverge(
                f"EVA's SVD of the layer inputs did not settle within {EVA_MAX_PASSES} passes over {len(batches)} "
                f"batch(es) of training examples; fix: use more training examples (data.train_size), a lower "
                f"lora.r, or another lora.init")
        return m(**inputs)

    # PEFT prints a line for each batch with fewer tokens than components: not for our output (--json).
    with contextlib.redirect_stdout(io.StringIO()):
        initialize_lora_eva_weights(model, dataloader=batches, forward_fn=forward, show_progress_bar=False,
                                    adapter_name=adapter)


def weights_folder(path: str, revision: str | None) -> str:
    """The folder of the base model's safetensors: a local folder as it is, a hub id from the local cache."""
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=revision, local_files_only=True)


def loftq_init(model, folder: str, adapter: str = "default") -> None:
    """LoftQ on a PEFT model over a 4-bit base (PEFT's replace_lora_weights_loftq): A and B set to the best
    rank-r fit of what 4-bit quantization took from each weight, read from the original safetensors; the
    quantized base is not changed. PEFT computes this on CUDA only (refused elsewhere by preflight).

    PEFT fits B·A to the quantization error, but the layer adds scaling·B·A (alpha/r, or alpha/√r with
    rsLoRA; PEFT issue #1982): A and B are each divided by √scaling, so the adapter starts where LoftQ
    puts it (base + update ≈ the original weights) whatever alpha is, with A and B still balanced."""
    import torch
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import replace_lora_weights_loftq

    replace_lora_weights_loftq(model, model_path=os.fspath(folder), adapter_name=adapter)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear4bit) and adapter in module.lora_A:
                root = float(module.scaling[adapter]) ** 0.5
                module.lora_A[adapter].weight.div_(root)
                module.lora_B[adapter].weight.div_(root)


def save_converted(model, folder: str | os.PathLike, init_dir: str | os.PathLike, adapter: str = "default") -> None:
    """Save a PiSSA or OLoRA adapter converted to a plain LoRA on the original base weights (rank 2r).

    PiSSA/OLoRA train W_res + s·B·A, where W = W_res + s·B0·A0. The same update on W is s·[B, -B0]·[A; A0]
    at rank 2r with the same scaling s (alpha doubled; ×√2 with rsLoRA, whose scaling is alpha/√r).
    PEFT's own conversion (`path_initial_model_for_weight_conversion`) keeps only A and B: it drops DoRA's
    trained magnitude vectors and trainable biases, and refuses rsLoRA with rank/alpha patterns. Here every
    other tensor is kept as trained: the converted weight W + s·B'·A' equals the trained W_res + s·B·A, so
    DoRA's magnitudes (a norm per output of that same weight) and the biases apply unchanged.
    `init_dir`: the adapter PEFT saved right after initialisation (B0, A0), with init_lora_weights=True."""
    import copy

    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    start = load_file(str(Path(init_dir) / "adapter_model.safetensors"))
    trained = get_peft_model_state_dict(model, adapter_name=adapter)
    out = {}
    for key, value in trained.items():
        if "lora_A" in key:
            value = torch.cat([value, start[key]], dim=0)
        elif "lora_B" in key:
            value = torch.cat([value, -start[key]], dim=1)
        out[key] = value.detach().contiguous()
    config = copy.deepcopy(model.peft_config[adapter])
    grow = 2 ** 0.5 if config.use_rslora else 2.0  # alpha/√r or alpha/r unchanged at rank 2r
    config.init_lora_weights, config.inference_mode = True, True
    config.r *= 2
    config.lora_alpha *= grow
    config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {k: v * grow for k, v in (config.alpha_pattern or {}).items()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(out, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


# -- the strategies -------------------------------------------------------------------------------------

OTHER_INITS = "or use another lora.init (default, pissa, eva)"


@dataclass
class InitSource:
    """What an initialisation may read before its adapter exists: the run's training examples (the first
    `n`, encoded as training encodes them), the padding id and device, and where the base weights are."""

    examples: Callable[[int], list]
    pad_id: int
    device: Any
    path: str  # the base model's folder or hub id
    revision: str | None = None


@dataclass
class InitCheck:
    """What a strategy's checks see: the run, where a `lora` knob of it is set in the file, and the setup."""

    run: RunSpec
    where: Callable[[str], str]  # a lora knob ("init", "r") -> its path in the file
    bits: int | None  # model.quantize bits, None for a full-precision base
    device: str  # the experiment's `device:`
    on_cpu: Callable[[], bool]  # whether it trains on the CPU (may import torch: asked only when needed)


class InitMethod:
    """How one `lora.init` starts an adapter. One instance per adapter: what `prepare` keeps (EVA's batches,
    the base weights PiSSA/OLoRA rewrite) is this adapter's. A new initialisation subclasses this, sets
    `name` and overrides what it needs; `register` adds it to the table."""

    name: ClassVar[str]
    timed: ClassVar[bool] = True  # its cost (an SVD, QR, data pass or fit) is stored as the run's init_s
    converts: ClassVar[bool] = False  # trains on a rewritten base: saved converted for the original one
    announce: ClassVar[str | None] = None  # said before a slow start, ahead of the training's progress bar

    def __init__(self, value: str):
        self.value = value  # the lora.init value as the schema stored it

    @classmethod
    def accepts(cls, value: str) -> bool:
        return value == cls.name

    def peft_init(self) -> dict:
        """LoraConfig's init_lora_weights (and eva_config) for this start."""
        return {"init_lora_weights": True}

    def check(self, c: InitCheck) -> list[Problem]:
        """Setups this start cannot run in, seen from the file alone (no data, no model)."""
        return []

    def check_fit(self, c: InitCheck, adapted: list[str], shapes: dict, n_train: int) -> list[Problem]:
        """Setups it cannot run in, seen with the data's size and the adapted layers' weight shapes."""
        return []

    def prepare(self, model, targets, source: InitSource) -> None:
        """Before PEFT makes the adapter: read or copy what it needs (not timed as init_s)."""

    def apply(self, peft_model, adapter: str) -> None:
        """After PEFT made the adapter `adapter`: set its weights (timed as init_s, with PEFT's own init)."""

    def save_converted(self, peft_model, folder, adapter: str, init_dir) -> None:
        raise NotImplementedError(f"lora.init {self.value} stores the adapter as trained")

    def restore(self, base_model) -> None:
        """Put back what it changed in the base model (called once the adapter is off the base)."""


INIT_METHODS: dict[str, type[InitMethod]] = {}


def register(cls: type[InitMethod]) -> type[InitMethod]:
    """Add a strategy to the table; a name twice, or one the schema does not accept, is refused."""
    if cls.name in INIT_METHODS:
        raise ValueError(f"lora.init {cls.name!r} is registered twice")
    if cls.name not in INITS:
        raise ValueError(f"lora.init {cls.name!r} is not one config.schema accepts ({', '.join(INITS)})")
    INIT_METHODS[cls.name] = cls
    return cls


def resolve_init(value: str) -> InitMethod:
    """The strategy for a `lora.init` value (as the schema stored it: pissa_niter_4, eva_rho_1 included)."""
    for cls in INIT_METHODS.values():
        if cls.accepts(value):
            return cls(value)
    raise ValueError(f"no initialisation strategy for lora.init {value!r}")


@register
class Default(InitMethod):
    """PEFT's default: A random (Kaiming uniform), B zero."""

    name = "default"
    timed = False


@register
class Gaussian(InitMethod):
    name = "gaussian"

    def peft_init(self) -> dict:
        return {"init_lora_weights": "gaussian"}


class _FromBase(InitMethod):
    """PiSSA and OLoRA: the adapter's start is taken out of the base weights (W = W_res + s·B0·A0), so the
    weights of the targeted linear layers are copied first and put back by `restore`; the trained adapter
    is stored converted to plain LoRA on the original weights (save_converted)."""

    converts = True
    title: ClassVar[str]

    def __init__(self, value: str):
        super().__init__(value)
        self.saved: dict[str, Any] = {}

    def peft_init(self) -> dict:
        return {"init_lora_weights": self.value}

    def check(self, c: InitCheck) -> list[Problem]:
        if not c.bits:
            return []
        return [Problem(c.where("init"), f"{self.title} moves the adapter's start out of the base weights, and on a "
                        f"{c.bits}-bit base the rest is quantized again: the adapter converted for the original base is "
                        "not the model trained, and the shared base cannot be put back as it was", self.value,
                        "remove model.quantize (train on the full-precision base), or use lora.init default, "
                        "gaussian or eva" + (" (or loftq, made for a 4-bit base)" if c.bits == 4 else ""))]

    def prepare(self, model, targets, source: InitSource) -> None:
        import torch

        names = None if targets == "all-linear" else set(targets)
        self.saved = {name: m.weight.detach().clone() for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"
                      and (names is None or name.rsplit(".", 1)[-1] in names)}

    def save_converted(self, peft_model, folder, adapter: str, init_dir) -> None:
        save_converted(peft_model, folder, init_dir, adapter)

    def restore(self, base_model) -> None:
        if not self.saved:
            return
        import torch

        modules = dict(base_model.named_modules())
        with torch.no_grad():
            for name, weight in self.saved.items():
                module = modules[name]
                module = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # still adapted
                module.weight.copy_(weight)
        self.saved = {}


@register
class PiSSA(_FromBase):
    """Principal singular vectors (exact SVD; pissa_niter_N: a fast randomized SVD with N iterations)."""

    name, title = "pissa", "PiSSA"

    @classmethod
    def accepts(cls, value: str) -> bool:
        return value == "pissa" or value.startswith("pissa_niter_")


@register
class OLoRA(_FromBase):
    """A QR decomposition of the base weights."""

    name, title = "olora", "OLoRA"


@register
class Eva(InitMethod):
    """A from the SVD of each layer's inputs over training examples, ranks redistributed by explained
    variance (a layer getting up to rho x r). PEFT's defaults but rho (tau 0.99: a component has settled
    when consecutive estimates' cosine similarity reaches it)."""

    name = "eva"
    announce = "EVA's initialisation, a pass over the first training examples"  # a minute: built-in model, CPU

    def __init__(self, value: str):
        super().__init__(value)
        self.rho = eva_rho(value)
        self.batches: list | None = None

    @classmethod
    def accepts(cls, value: str) -> bool:
        return eva_rho(value) is not None

    def peft_init(self) -> dict:
        from peft import EvaConfig

        return {"init_lora_weights": "eva", "eva_config": EvaConfig(rho=self.rho)}

    def check_fit(self, c: InitCheck, adapted: list[str], shapes: dict, n_train: int) -> list[Problem]:
        """EVA over a single batch, or with rank x rho above a layer's inputs (PEFT fails after the model loaded)."""
        run, rho, out = c.run, self.rho, []
        if n_train <= EVA_BATCH:
            out.append(Problem(c.where("init"), f"EVA settles its SVD of the layer inputs over successive batches "
                               f"of {EVA_BATCH} training examples, and {n_train} training example(s) make one batch: every "
                               "pass would repeat the same examples", run.lora.init,
                               f"give EVA at least {EVA_BATCH + 1} training examples (up to {EVA_BATCH * EVA_BATCHES} are "
                               "used; data.train_size), or use lora.init default"))
        over = []  # (components, inputs, rank, where the rank is set) of layers whose SVD cannot have them
        for m in adapted:
            shape = shapes[m + ".weight"]
            key = next((k for k in run.lora.rank_pattern or {} if pattern_regex(k).match(m)), None)
            rank = run.lora.rank_pattern[key] if key is not None else run.lora.r
            if len(shape) == 2 and shape[-1] > 1 and round(rank * rho) > shape[-1]:  # not 4-bit's packed [n, 1]
                over.append((round(rank * rho), shape[-1], rank, "rank_pattern" if key is not None else "r"))
        if over:
            comps, inputs, rank, knob = min(over, key=lambda o: o[1])
            out.append(Problem(c.where(knob), f"EVA fits rank x rho = {comps} components of each targeted layer's "
                               f"inputs, more than the {inputs} inputs a layer of rank {rank} has (PEFT fails after the "
                               f"model loaded)", rank,
                               f"use a rank of at most {int(inputs // rho)} with rho {rho:g}, or a lower rho (eva_rho_1)"))
        return out

    def prepare(self, model, targets, source: InitSource) -> None:
        self.batches = eva_batches(source.examples(EVA_BATCH * EVA_BATCHES), source.pad_id, source.device)

    def apply(self, peft_model, adapter: str) -> None:
        eva_init(peft_model, self.batches, adapter)


@register
class LoftQ(InitMethod):
    """Starts as a plain LoRA and has A and B replaced by LoftQ's fit (loftq_init)."""

    name = "loftq"

    def __init__(self, value: str):
        super().__init__(value)
        self.folder: str | None = None

    def check(self, c: InitCheck) -> list[Problem]:
        """A 4-bit base, a CUDA device (PEFT computes it there only; measured: on a CPU it fails with "Torch
        not compiled with CUDA enabled"), and no DoRA (DoRA fixes its magnitudes before LoftQ replaces A and
        B, so the adapter would not start where LoftQ puts it)."""
        out, where = [], c.where("init")
        if c.bits != 4:
            out.append(Problem(where, "LoftQ fits the adapter to what 4-bit quantization takes from the base "
                               f"weights, so it needs a 4-bit base; model.quantize is {f'{c.bits} bits' if c.bits else 'not set'}",
                               "loftq", "set `model: {name: ..., quantize: {bits: 4}}` (QLoRA), " + OTHER_INITS))
        elif c.on_cpu():
            from importlib.metadata import version

            out.append(Problem(where, f"PEFT {version('peft')} computes LoftQ on a CUDA device only, and this "
                               f"experiment trains on the CPU (device: {c.device})", "loftq",
                               "run it where a CUDA GPU is visible (device: auto or cuda), " + OTHER_INITS))
        if c.run.lora.use_dora:
            out.append(Problem(where, "LoftQ with DoRA: DoRA fixes its magnitudes from the base before LoftQ sets "
                               "A and B, so the adapter would not start where LoftQ puts it", "loftq",
                               "remove use_dora, " + OTHER_INITS))
        return out

    def prepare(self, model, targets, source: InitSource) -> None:
        self.folder = weights_folder(source.path, source.revision)

    def apply(self, peft_model, adapter: str) -> None:
        loftq_init(peft_model, self.folder, adapter)
