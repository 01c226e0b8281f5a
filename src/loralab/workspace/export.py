"""A stored run out of the workspace, as others load it: the PEFT adapter folder, or the base model with
the adapter merged in (safetensors, with its tokenizer), each with a model card that says how it was
trained and what it measured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loralab.errors import Problem, SpecError
from loralab.workspace.store import RunRecord

HEADLINE = ("eval_loss", "eval_ppl", "generalization_gap", "drift_kl", "train_s", "total_s", "trainable_params")


def export(rec: RunRecord, out: str | Path, merge: bool = False) -> Path:
    """Write `rec`'s adapter (or, with `merge`, the merged model) and a README.md model card into `out`."""
    out = Path(out)
    if rec.kind != "lora" or rec.status != "finished" or not rec.adapter_path:
        raise SpecError(f"run {rec.name} has no adapter to export",
                        [Problem("RUN", f"{rec.kind} run, {rec.status}", rec.name,
                                 "export a finished LoRA run (see `loralab ls`)")])
    adapter = Path(rec.adapter_path)
    if not (adapter / "adapter_config.json").is_file():
        raise SpecError(f"the adapter of run {rec.name} is missing on disk",
                        [Problem("RUN", "adapter folder missing or incomplete", str(adapter),
                                 "run `loralab doctor --repair`, then train the run again")])
    if out.exists() and any(out.iterdir()):
        raise SpecError(f"--out {out} is not empty", [Problem("--out", "a folder with files in it", str(out),
                                                               "give a new or empty folder")])
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        _merged(rec, adapter, out)
    else:
        for f in adapter.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    (out / "README.md").write_text(model_card(rec, merge), encoding="utf-8")
    return out


def _merged(rec: RunRecord, adapter: Path, out: Path) -> None:
    """The base model with the adapter's update added to its weights (PEFT merge_and_unload): a plain
    transformers model, loadable by AutoModelForCausalLM.from_pretrained without PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = rec.model.get("path") or rec.model.get("name")
    dtype = getattr(torch, str(rec.config.get("dtype") or "float32"))
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, use_safetensors=True)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)


def model_card(rec: RunRecord, merged: bool) -> str:
    """README.md for the exported folder: the Hub's front matter, then the run's settings and outcomes."""
    base = rec.model.get("name")
    front = ["---", f"base_model: {json.dumps(str(base))}", "library_name: " + ("transformers" if merged else "peft"),
             "tags: [lora, loralab]", "---", ""]
    what = "the base model with this LoRA adapter merged into its weights" if merged else "a LoRA adapter (PEFT format)"
    lines = [f"# {rec.experiment}/{rec.name}" + (f" (seed {rec.seed})" if rec.seed is not None else ""), "",
             f"{what.capitalize()}, trained by loralab on {rec.data.get('name')} "
             f"({rec.data.get('n_train')} training examples), from {base}.", "", "## Settings", ""]
    for section in ("lora", "train", "generate"):
        for key, value in (rec.config.get(section) or {}).items():
            lines.append(f"- {section}.{key}: `{value}`")
    lines.append(f"- device: `{rec.config.get('device')}`, dtype: `{rec.config.get('dtype')}`")
    lines += ["", "## Measured (on its held-out examples)", ""]
    for key in HEADLINE + tuple(k for k in sorted(rec.metrics) if k.startswith(("rouge_l@", "mean_tokens@"))):
        if isinstance(rec.metrics.get(key), (int, float)):
            lines.append(f"- {key}: {rec.metrics[key]:.6g}")
    if merged:
        lines += ["", "Load it: `AutoModelForCausalLM.from_pretrained(this_folder)`."]
    else:
        lines += ["", f"Load it: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), this_folder)`."]
    lines += ["", f"loralab run id `{rec.id}`; versions: " + ", ".join(
        f"{k} {v}" for k, v in (rec.env.get("versions") or {}).items() if k in ("loralab", "torch", "transformers", "peft")), ""]
    return "\n".join(front + lines)
