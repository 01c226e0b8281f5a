"""`loralab export`: the adapter as PEFT loads it, or the merged model as transformers loads it, each
with a model card, and the same outputs as the run's own model."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import loralab
from loralab.cli import app

from test_runner import experiment


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    runs = """
runs:
  A:
    lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj], use_dora: true}
    train: {learning_rate: 1.0e-2, batch_size: 2, max_steps: 4}
    generate: {max_new_tokens: 4}
"""
    exp = loralab.load(experiment(tmp, tiny_llama, runs, name="ex"))
    loralab.run(exp, workspace=tmp / "ws")
    return tmp, tiny_llama


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([[3, 5, 7, 11, 13, 17]])).logits.float()


def test_the_adapter_exports_in_peft_format_with_a_card(trained):
    tmp, base = trained
    out = CliRunner().invoke(app, ["export", "A", "--out", str(tmp / "adapter"), "-w", str(tmp / "ws")])
    assert out.exit_code == 0, out.output
    folder = tmp / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {f.name for f in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: peft" in card and "lora.use_dora: `True`" in card
    assert "- eval_loss: " in card
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    stored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), loralab.get_run("A", tmp / "ws").adapter_path)
    assert torch.equal(logits(model), logits(stored))


def test_the_merged_model_loads_without_peft_and_answers_as_the_adapter_does(trained):
    tmp, base = trained
    folder = loralab.api.export("A", tmp / "merged", merge=True, workspace=tmp / "ws")
    names = {f.name for f in folder.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names and not any(n.endswith(".bin") for n in names)
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in n for n, _ in merged.named_modules())
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), loralab.get_run("A", tmp / "ws").adapter_path)
    assert torch.allclose(logits(merged), logits(adapter), atol=1e-4, rtol=1e-4)  # merging only reorders float sums
    assert "library_name: transformers" in (folder / "README.md").read_text()


def test_export_refuses_what_it_cannot_write(trained):
    tmp, _ = trained
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("mine")
    for args, needle in [(["base", "--out", str(tmp / "fresh")], "has no adapter"),
                         (["A", "--out", str(tmp / "full")], "is not empty")]:
        res = CliRunner().invoke(app, ["export", *args, "-w", str(tmp / "ws")])
        assert res.exit_code == 2 and needle in res.output, res.output
    assert (tmp / "full" / "keep.txt").read_text() == "mine" and not (tmp / "fresh").exists()
