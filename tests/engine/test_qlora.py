"""QLoRA: the base model in 4 or 8 bits (bitsandbytes, which quantizes on a CPU too), the adapter trained
on top; a quantized base is another base (its adapters are not the full-precision ones)."""

from __future__ import annotations

import importlib.util

import pytest
from typer.testing import CliRunner

import loralab
from loralab.cli import app

from test_runner import experiment

RUNS = """
runs:
  A:
    lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}
    train: {learning_rate: 1.0e-2, batch_size: 2, max_steps: 4}
    generate: {max_new_tokens: 4}
"""


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A tiny Llama whose layers take 64 inputs: bitsandbytes' 4-bit blocks are 64 wide, and its packed
    CPU kernels (on CPUs with AVX-512 bf16) refuse narrower layers; real models are far wider."""
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("wide_llama"), arch="llama", hidden_size=64)


@pytest.mark.parametrize("quantize, suffix", [("{bits: 4}", "+4bit-nf4-dq"), ("{bits: 8}", "+8bit")])
def test_a_quantized_base_trains_an_adapter_and_is_another_base(wide_llama, tmp_path, quantize, suffix):
    if importlib.util.find_spec("bitsandbytes") is None:  # make test installs it: this fails in CI, not skips
        pytest.fail("bitsandbytes is not installed: pip install 'loralab[qlora]'")
    tiny_llama = wide_llama
    f = experiment(tmp_path, tiny_llama, "evaluation: {drift: false}\n" + RUNS, name="q")
    f.write_text(f.read_text().replace(f"model: {tiny_llama}", f"model: {{name: {tiny_llama}, quantize: {quantize}}}"))
    result = loralab.run(loralab.load(f), workspace=tmp_path / "ws")
    a = next(r for r in result.records if r.name == "A")
    assert a.status == "finished" and a.model["fingerprint"].endswith(suffix) and a.adapter_path
    assert a.metrics["eval_loss"] < next(r for r in result.records if r.name == "base").metrics["eval_loss"] + 1.0
    (tmp_path / "plain").mkdir()
    plain = experiment(tmp_path / "plain", tiny_llama, "evaluation: {drift: false}\n" + RUNS, name="q")
    b = next(r for r in loralab.run(loralab.load(plain), workspace=tmp_path / "ws").records if r.name == "A")
    assert b.id != a.id and b.model["fingerprint"] + suffix == a.model["fingerprint"]  # trained again, not reused


def test_quantize_without_bitsandbytes_is_one_message_before_anything_runs(tiny_llama, tmp_path, monkeypatch):
    f = experiment(tmp_path, tiny_llama, RUNS, name="q")
    f.write_text(f.read_text().replace(f"model: {tiny_llama}", f"model: {{name: {tiny_llama}, quantize: {{bits: 4}}}}"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    for command in (["validate", str(f)], ["run", str(f), "-w", str(tmp_path / "ws")]):
        out = CliRunner().invoke(app, command)
        assert out.exit_code == 2 and "pip install 'loralab[qlora]'" in out.output, out.output
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_run_gives_the_same_numbers_alone_and_after_another_run(wide_llama, tmp_path, bits):
    """The quantized base is shared by the runs of a file: run X alone and X after Y must train and evaluate
    on the same base, bit for bit. On a CPU with AVX-512 bf16, bitsandbytes repacked 4-bit weights at the
    first evaluation (block scales rounded to bf16, and a kernel with no backward: X trained after the base's
    evaluation got no gradient and stored the base's loss) and unpacked them lossily at each adapter save, so
    X's loss depended on what ran before it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.fail("bitsandbytes is not installed: pip install 'loralab[qlora]'")
    x = RUNS.replace("  A:", "  X:")
    y = RUNS.replace("  A:", "  Y:").replace("1.0e-2", "3.0e-2").replace("runs:\n", "")

    def records(name, runs):
        (tmp_path / name).mkdir()
        f = experiment(tmp_path / name, wide_llama, "evaluation: {drift: false}\n" + runs, name="q")
        f.write_text(f.read_text().replace(f"model: {wide_llama}", f"model: {{name: {wide_llama}, quantize: {{bits: {bits}}}}}"))
        return {r.name: r for r in loralab.run(loralab.load(f), workspace=tmp_path / name / "ws").records}

    alone = records("alone", x)
    after = records("after", x.replace("runs:\n", "runs:\n" + y))  # Y runs first: the file's order
    assert list(after) == ["base", "Y", "X"]
    assert alone["X"].status == after["X"].status == after["Y"].status == "finished"
    assert alone["base"].metrics["eval_loss"] == after["base"].metrics["eval_loss"]
    assert alone["X"].metrics["eval_loss"] == after["X"].metrics["eval_loss"]
    assert alone["X"].metrics["eval_loss"] != alone["base"].metrics["eval_loss"]  # X trained: its adapter acts


def quantized(f, model, bits):
    f.write_text(f.read_text().replace(f"model: {model}", f"model: {{name: {model}, quantize: {{bits: {bits}}}}}"))
    return f


@pytest.mark.parametrize("bits, knobs, where, fix", [
    (4, "init: pissa", "runs.A.lora.init", "remove model.quantize"),
    (8, "init: olora", "runs.A.lora.init", "remove model.quantize"),
    (8, "use_dora: true", "runs.A.lora.use_dora", "bits: 4"),
])
def test_validate_refuses_what_a_quantized_base_cannot_train(wide_llama, tmp_path, bits, knobs, where, fix):
    """PiSSA/OLoRA rewrite the base (quantized again, it cannot be put back) and DoRA on an 8-bit CPU base
    breaks its layers: refused by validate and by run before anything is written, field, value and fix."""
    runs = RUNS.replace("target_modules: [q_proj, v_proj]", f"target_modules: [q_proj, v_proj], {knobs}")
    f = quantized(experiment(tmp_path, wide_llama, "device: cpu\n" + runs, name="q"), wide_llama, bits)
    for command in (["validate", str(f)], ["run", str(f), "-w", str(tmp_path / "ws")]):
        out = CliRunner().invoke(app, command)
        assert out.exit_code == 2 and where in out.output and fix in out.output, out.output
    assert not (tmp_path / "ws").exists()


def test_a_failing_run_leaves_the_quantized_base_as_it_was(wide_llama, tmp_path, monkeypatch):
    """DoRA on an 8-bit CPU base (validate refuses it; forced here) fails in training, and PEFT has by then
    swapped a copy without its scales into the shared base's layers: the next run must still train on
    the base as loaded, and give the numbers it gives alone."""
    from loralab.execute import preflight

    def records(name, runs):
        (tmp_path / name).mkdir()
        f = quantized(experiment(tmp_path / name, wide_llama, "evaluation: {drift: false}\n" + runs, name="q"), wide_llama, 8)
        return {r.name: r for r in loralab.run(loralab.load(f), workspace=tmp_path / name / "ws").records}

    x = RUNS.replace("  A:", "  X:")
    y = RUNS.replace("  A:", "  Y:").replace("[q_proj, v_proj]", "[q_proj, v_proj], use_dora: true").replace("runs:\n", "")
    monkeypatch.setattr(preflight, "init_problems", lambda exp, runs: [])
    alone, after = records("alone", x), records("after", x.replace("runs:\n", "runs:\n" + y))
    assert after["Y"].status == "failed"  # PEFT's DoRA on a CPU 8-bit layer, as validate says
    assert alone["X"].status == after["X"].status == "finished"
    assert alone["X"].metrics["eval_loss"] == after["X"].metrics["eval_loss"]


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_base_gives_the_evaluated_model_of_a_quantized_run(wide_llama, tmp_path, bits):
    """`export --merge` of a QLoRA run merged the adapter into the full-precision base: another model than
    the one evaluated. merge_base rebuilds the quantized base's dequantized weights: merged into them, the
    adapter gives the stored eval loss (4 bits: to float rounding; 8 bits also quantized each layer's
    inputs when evaluated, which merge_base says in its note); at 4 bits far nearer than the full-precision merge."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loralab.engine.models import merge_base
    from loralab.engine.train import eval_loss
    from loralab.execute.prepare import prepare

    f = quantized(experiment(tmp_path, wide_llama, "evaluation: {drift: false}\n" + RUNS, name="q"), wide_llama, bits)
    exp = loralab.load(f)
    a = next(r for r in loralab.run(exp, workspace=tmp_path / "ws").records if r.name == "A")
    assert a.model["quantize"]["bits"] == bits
    prepared = prepare(exp)
    pad = prepared.base.tokenizer.pad_token_id

    def merged_loss(base):
        return eval_loss(PeftModel.from_pretrained(base, a.adapter_path).merge_and_unload(), prepared.eval_encoded, pad_id=pad)

    base, note = merge_base(a.model, torch.float32)
    ours = merged_loss(base)
    naive = merged_loss(AutoModelForCausalLM.from_pretrained(wide_llama, dtype=torch.float32))
    stored = a.metrics["eval_loss"]
    if bits == 4:
        assert note is None and ours == pytest.approx(stored, rel=1e-5)
        assert abs(ours - stored) < abs(naive - stored) / 10
    else:  # int8 inputs: as near as the naive merge on this tiny model, so only the bound and the note
        assert "quantized each layer's inputs" in note and ours == pytest.approx(stored, rel=1e-3)
    # rows stored before the quantization was recorded: read off the fingerprint
    old = {k: v for k, v in a.model.items() if k != "quantize"}
    assert merge_base(old, torch.float32)[1] == note


def test_export_merge_of_a_4bit_run_is_the_evaluated_model(wide_llama, tmp_path):
    """`export --merge` of a QLoRA run: the merged folder, loaded by plain transformers, gives the stored
    eval loss (the adapter went into the dequantized 4-bit weights, not the full-precision original)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loralab import api
    from loralab.engine.train import eval_loss
    from loralab.execute.prepare import prepare

    f = quantized(experiment(tmp_path, wide_llama, "evaluation: {drift: false}\n" + RUNS, name="q"), wide_llama, 4)
    exp = loralab.load(f)
    a = next(r for r in loralab.run(exp, workspace=tmp_path / "ws").records if r.name == "A")
    done = api.export("q/A", tmp_path / "merged", merge=True, workspace=tmp_path / "ws", base=str(wide_llama))
    merged = AutoModelForCausalLM.from_pretrained(done.folder, dtype=torch.float32)
    prepared = prepare(exp)
    loss = eval_loss(merged, prepared.eval_encoded, pad_id=prepared.base.tokenizer.pad_token_id)
    assert loss == pytest.approx(a.metrics["eval_loss"], rel=1e-5)
