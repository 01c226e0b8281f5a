"""LoRA variants as knobs: rsLoRA, DoRA and LoRA+ train, change what they claim to change, and their
adapters reload in plain PEFT with the outcomes the run stored."""

from __future__ import annotations

import pytest
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

import loralab
from loralab.config.schema import LoraSpec, TrainSpec
from loralab.engine.train import eval_loss, train_lora
from loralab.execute.prepare import prepare

from test_train import encoded

RUN = """
runs:
  V:
    lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj], {variant}}}
    train: {{learning_rate: 1.0e-2, batch_size: 2, max_steps: 4}}
    generate: {{max_new_tokens: 4}}
"""


@pytest.mark.parametrize("variant, check", [
    ("use_rslora: true", lambda cfg: cfg.use_rslora),
    ("use_dora: true", lambda cfg: cfg.use_dora),
    ("loraplus_lr_ratio: 16", lambda cfg: not cfg.use_dora and not cfg.use_rslora),
])
def test_each_variant_trains_and_its_adapter_reloads_in_plain_peft(tiny_llama, tmp_path, variant, check):
    f = tmp_path / "v.yaml"
    f.write_text(f"name: v\nmodel: {tiny_llama}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                 "evaluation: {drift: false}\n" + RUN.format(variant=variant))
    exp = loralab.load(f)
    rec = next(r for r in loralab.run(exp, workspace=tmp_path / "ws").records if r.name == "V")
    assert rec.status == "finished"
    key, _, value = variant.partition(": ")
    assert rec.config["lora"][key] == yaml.safe_load(value)  # stored with the run (and in its adapter id)
    prepared = prepare(exp)
    model = PeftModel.from_pretrained(prepared.base.model, rec.adapter_path)
    assert check(model.peft_config["default"])
    again = eval_loss(model, prepared.eval_encoded, pad_id=prepared.base.tokenizer.pad_token_id)
    assert again == pytest.approx(rec.metrics["eval_loss"], rel=1e-5)


def test_a_variant_at_its_default_leaves_the_stored_settings_as_they_were():
    assert set(LoraSpec().model_dump()) == {"r", "alpha", "dropout", "target_modules", "bias"}
    assert LoraSpec(use_dora=True).model_dump()["use_dora"] is True


def test_loraplus_trains_b_faster_than_a(tiny_llama):
    """Adam moves a weight by about its learning rate on its first step: with LoRA+ (ratio 16) the B
    matrices move about 16 times as far as without it. (A does not move on the first step either way:
    B starts at zero, so A's gradient is zero.)"""
    tok = AutoTokenizer.from_pretrained(tiny_llama)

    def first_step(ratio):
        set_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        train_lora(model, encoded(tok), TrainSpec(learning_rate=1e-3, batch_size=2, max_steps=1),
                   pad_id=tok.pad_token_id, loraplus_lr_ratio=ratio)
        moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad}
        return max(v for n, v in moved.items() if "lora_B" in n)

    plain, plus = first_step(None), first_step(16.0)
    assert plain > 0 and 8 < plus / plain < 32


def test_variant_knobs_are_validated(tmp_path):
    from loralab.errors import SpecError

    f = tmp_path / "bad.yaml"
    f.write_text("name: bad\nruns:\n  A: {lora: {loraplus_lr_ratio: 0.5, use_dora: maybe}}\n")
    with pytest.raises(SpecError) as info:
        loralab.load(f)
    text = str(info.value) + " ".join(str(p) for p in info.value.problems)
    assert "loraplus_lr_ratio" in text and "use_dora" in text


@pytest.mark.parametrize("arch, preset, expected", [
    ("llama", "attention", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("llama", "mlp", ["gate_proj", "up_proj", "down_proj"]),
    ("gpt_neox", "attention", ["query_key_value", "dense"]),
    ("gpt_neox", "mlp", ["dense_h_to_4h", "dense_4h_to_h"]),
])
def test_presets_resolve_per_architecture(tmp_path, arch, preset, expected):
    from tiny import make_tiny_model

    from loralab.engine.models import resolve_target_modules

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / arch, arch=arch))
    targets, note = resolve_target_modules(model, [preset])
    assert targets == expected and preset in note


def test_layers_and_rank_pattern_place_the_adapters_and_are_stored(tiny_llama, tmp_path):
    f = tmp_path / "where.yaml"
    f.write_text(f"name: where\nmodel: {tiny_llama}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                 "evaluation: {drift: false}\n" + RUN.format(variant="layers: [1], rank_pattern: {v_proj: 2}"))
    exp = loralab.load(f)
    rec = next(r for r in loralab.run(exp, workspace=tmp_path / "ws").records if r.name == "V")
    assert rec.status == "finished" and rec.config["lora"]["layers"] == [1]
    assert rec.config["resolved_target_modules"] == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(f"{rec.adapter_path}/adapter_model.safetensors").items()}
    assert all(".layers.1." in k for k in shapes)  # block 1 only
    assert {v[0] for k, v in shapes.items() if "v_proj.lora_A" in k} == {2}  # rank 2 on v_proj
    assert {v[0] for k, v in shapes.items() if "q_proj.lora_A" in k} == {4}  # r elsewhere


def test_layers_beyond_the_model_are_refused_before_training(tiny_llama, tmp_path):
    from loralab.errors import SpecError

    f = tmp_path / "deep.yaml"
    f.write_text(f"name: deep\nmodel: {tiny_llama}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                 + RUN.format(variant="layers: [0, 7]"))
    with pytest.raises(SpecError) as info:
        loralab.validate(f)
    assert "the model has 2 blocks (0 to 1)" in " ".join(str(p) for p in info.value.problems)


@pytest.mark.parametrize("init", ["gaussian", "pissa", "pissa_niter_2", "olora"])
def test_initialisations_train_reload_on_the_unchanged_base_and_leave_it_unchanged(tiny_llama, tmp_path, init):
    f = tmp_path / "init.yaml"
    f.write_text(f"name: init\nmodel: {tiny_llama}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                 + RUN.format(variant=f"init: {init}") + RUN.format(
                     variant="init: default").replace("  V:", "  W:").replace("runs:\n", ""))
    exp = loralab.load(f)
    result = loralab.run(exp, workspace=tmp_path / "ws")
    v, w = (next(r for r in result.records if r.name == n) for n in ("V", "W"))
    assert v.status == w.status == "finished" and v.config["lora"]["init"] == init and "init" not in w.config["lora"]
    assert v.metrics["init_s"] >= 0 and v.metrics["total_s"] >= v.metrics["train_s"] + v.metrics["eval_s"]
    # The run after V trained on the original base: its losses equal a run alone.
    alone = tmp_path / "alone.yaml"
    alone.write_text(f.read_text().replace(RUN.format(variant=f"init: {init}").split("runs:\n")[1], ""))
    w_alone = next(r for r in loralab.run(loralab.load(alone), workspace=tmp_path / "ws2").records if r.name == "W")
    assert w_alone.metrics["eval_loss"] == pytest.approx(w.metrics["eval_loss"], rel=1e-6)
    # V's adapter (converted to plain LoRA for PiSSA and OLoRA) gives the stored loss on the unchanged base.
    prepared = prepare(exp)
    model = PeftModel.from_pretrained(prepared.base.model, v.adapter_path)
    again = eval_loss(model, prepared.eval_encoded, pad_id=prepared.base.tokenizer.pad_token_id)
    assert again == pytest.approx(v.metrics["eval_loss"], rel=1e-4)
    assert not (tmp_path / "ws" / "runs" / v.id / "adapter_init").exists()
    # Drift is measured against the original base (not against PiSSA's residual weights): an adapter that
    # trained 4 steps moves the model about as far as the plain one did, not orders of magnitude further.
    assert v.metrics["drift_kl"] < 20 * w.metrics["drift_kl"] + 0.05


def test_loraplus_honours_weight_decay_as_a_plain_peft_loraplus_loop_does(tiny_llama):
    """LoRA+ with train.weight_decay: decay 0 and 0.5 give different adapters, each equal to an independent
    loop (transformers' own loss, PEFT's LoRA+ optimizer given the same decay, unfused AdamW). One batch of
    all 8 examples a step, so data order cannot matter; the two decays differ by ~1e-3 after 3 steps at
    lr 1e-2, far above the 1e-5 the two loops' float rounding may differ by."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    from loralab.engine.train import collate

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    enc = encoded(tok)
    spec = dict(learning_rate=1e-2, batch_size=8, max_steps=3, scheduler="constant", max_grad_norm=None)

    def fresh():
        set_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               task_type="CAUSAL_LM"))

    def adapter(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def ours(decay):
        model = fresh()
        train_lora(model, enc, TrainSpec(weight_decay=decay, **spec), pad_id=tok.pad_token_id, loraplus_lr_ratio=4.0)
        return adapter(model)

    def reference(decay):
        model = fresh()
        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=4.0,
                                        loraplus_weight_decay=decay)
        batch = collate(enc, tok.pad_token_id, torch.device("cpu"))
        model.train()
        for _ in range(3):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        return adapter(model)

    none, half = ours(0.0), ours(0.5)
    assert max(float((none[n] - half[n]).abs().max()) for n in none) > 1e-4  # the decay acted
    for decay, got in ((0.0, none), (0.5, half)):
        want = reference(decay)
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-5, msg=f"{n} at weight decay {decay}")


@pytest.mark.parametrize("model, variant", [
    ("tiny_llama", "init: pissa, use_dora: true"),
    ("tiny_llama", "init: olora, use_dora: true"),
    ("tiny_llama", "init: pissa_niter_2, use_rslora: true, rank_pattern: {v_proj: 2}, alpha_pattern: {q_proj: 4}"),
    ("tiny_llama", "init: olora, use_rslora: true, use_dora: true, alpha_pattern: {v_proj: 16}"),
    ("tiny_neox", "init: olora, bias: all"),
])
def test_pissa_and_olora_store_the_model_they_trained(request, tmp_path, model, variant):
    """A PiSSA/OLoRA adapter is stored converted to a plain LoRA on the original base: the stored eval loss
    must be the trained model's (measured here on its residual base, before any conversion), and plain
    PEFT must give it again from the stored folder on the untouched base. PEFT's own conversion keeps
    only A and B (DoRA's trained magnitudes and trained biases were lost: 0.01-0.03 off) and refuses
    rsLoRA with rank/alpha patterns (the run failed at save, after training)."""
    from loralab.engine.train import train_lora
    from loralab.execute.prepare import select_runs
    from loralab.execute.runner import restore_base, train_encoded, with_lora

    folder = request.getfixturevalue(model)
    f = tmp_path / "init.yaml"
    f.write_text(f"name: init\nmodel: {folder}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                 "evaluation: {drift: false}\n" + RUN.format(variant=variant + ", dropout: 0"))
    exp = loralab.load(f)
    rec = next(r for r in loralab.run(exp, workspace=tmp_path / "ws").records if r.name == "V")
    assert rec.status == "finished", rec.error
    prepared = prepare(exp)
    pad = prepared.base.tokenizer.pad_token_id
    run = select_runs(exp, ["V"])[0]
    trained = with_lora(prepared, run)
    train_lora(trained, train_encoded(prepared, run), run.train, pad_id=pad)
    want = eval_loss(trained, prepared.eval_encoded, pad_id=pad)
    restore_base(prepared, trained)
    assert rec.metrics["eval_loss"] == pytest.approx(want, rel=1e-5)
    again = PeftModel.from_pretrained(prepared.base.model, rec.adapter_path)
    assert eval_loss(again, prepared.eval_encoded, pad_id=pad) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("variant, where, says", [
    ("rank_pattern: {o_proj: 2}", "runs.V.lora.rank_pattern", "'o_proj' matches none of the 4 layers"),
    ("alpha_pattern: {v_prj: 2, q_proj: 4}", "runs.V.lora.alpha_pattern", "'v_prj' matches none"),
    ("layers: [1], rank_pattern: {layers.0.self_attn.v_proj: 2}", "runs.V.lora.rank_pattern", "matches none of the 2"),
    ("rank_pattern: {v_proj: 64}", "runs.V.lora.rank_pattern", "key 'v_proj': rank 64 is above the width 16"),
])
def test_pattern_keys_that_match_no_adapted_layer_are_refused_by_validate(tiny_llama, tmp_path, variant, where, says):
    """A rank_pattern/alpha_pattern key that matches none of the layers LoRA goes on (another layer, a typo, a
    block outside `layers`) was stored with the run as if applied, and a pattern's rank above its layers' width
    passed where lora.r would not; validate and run refuse them now."""
    from typer.testing import CliRunner

    from loralab.cli import app

    f = tmp_path / "p.yaml"
    f.write_text(f"name: p\nmodel: {tiny_llama}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                 + RUN.format(variant=variant))
    for command in (["validate", str(f)], ["run", str(f), "-w", str(tmp_path / "ws")]):
        out = CliRunner().invoke(app, command)
        text = " ".join(out.output.split())
        assert out.exit_code == 2 and where in text and says in text and "Fix: " in text, out.output
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_run_that_trains_biases_leaves_the_shared_base_as_loaded(tiny_neox, tmp_path, bias):
    """`lora.bias: all` / `lora_only` trains the base's own biases in place (PEFT): unloading the adapter left
    them trained in the base every later run of the file shares, so X after Y gave other numbers than X alone."""
    def records(name, runs):
        f = tmp_path / f"{name}.yaml"
        f.write_text(f"name: {name}\nmodel: {tiny_neox}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}}\n"
                     "evaluation: {drift: false}\n" + runs)
        return {r.name: r for r in loralab.run(loralab.load(f), workspace=tmp_path / name).records}

    x = RUN.format(variant="dropout: 0").replace("  V:", "  X:")
    y = RUN.format(variant=f"bias: {bias}").replace("  V:", "  Y:").replace("runs:\n", "")
    alone, after = records("alone", x), records("after", x.replace("runs:\n", "runs:\n" + y))
    assert list(after) == ["base", "Y", "X"] and after["Y"].status == "finished"
    assert after["X"].metrics["eval_loss"] == alone["X"].metrics["eval_loss"]
    assert after["base"].metrics["eval_loss"] == alone["base"].metrics["eval_loss"]
