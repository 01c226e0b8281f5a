"""EVA and LoftQ initialisations: EVA's data pass trains and reloads (its redistributed ranks included),
its cost is stored; LoftQ is refused where PEFT cannot run it (no 4-bit base, a CPU, DoRA), starts nearer
the original weights than the 4-bit base and reloads (PEFT's fit moved to the CPU), and trains on a GPU."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from peft import EvaConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from typer.testing import CliRunner

import loralab
from loralab.cli import app
from loralab.engine import inits
from loralab.engine.train import eval_loss
from loralab.execute.prepare import prepare

from test_qlora import wide_llama  # noqa: F401 (a fixture: a tiny Llama wide enough for 4-bit blocks)
from test_train import encoded

DATA = "data: {builtin: stdlib-docstrings, train_size: 16, eval_size: 4}\nevaluation: {drift: false}\n"
RUN = """
  {name}:
    lora: {{r: 4, alpha: 8, target_modules: [{targets}], {variant}}}
    train: {{learning_rate: 1.0e-2, batch_size: 2, max_steps: 4}}
    generate: {{max_new_tokens: 4}}
"""


def write(tmp_path, model, *runs, extra: str = "", name: str = "init"):
    f = tmp_path / f"{name}.yaml"
    f.write_text(f"name: {name}\nmodel: {model}\n{DATA}{extra}runs:" + "".join(RUN.format(**r) for r in runs))
    return f


def reloaded_loss(exp, rec) -> float:
    prepared = prepare(exp)
    model = PeftModel.from_pretrained(prepared.base.model, rec.adapter_path)
    return eval_loss(model, prepared.eval_encoded, pad_id=prepared.base.tokenizer.pad_token_id)


def test_eva_sets_a_to_orthonormal_input_directions(tiny_llama):
    """EVA's A rows are principal directions of the layer inputs (orthonormal, unwhitened), B is zero: the
    model starts as the base. PEFT's default A (Kaiming uniform) is not orthonormal, so this fails if EVA
    did not run."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    set_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva",
                                      eva_config=EvaConfig(), task_type="CAUSAL_LM"))
    inits.eva_init(model, inits.eva_batches(encoded(tok) * 4, tok.pad_token_id, torch.device("cpu")))
    a = {n: p.detach() for n, p in model.named_parameters() if "lora_A" in n}
    assert a and all(torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-4) for w in a.values())
    assert all(float(p.detach().abs().max()) == 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_eva_batches_are_bounded_and_padded_with_answer_labels(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    enc = encoded(tok) * 100
    batches = inits.eva_batches(enc, tok.pad_token_id, torch.device("cpu"))
    assert len(batches) == inits.EVA_BATCHES and all(len(b["input_ids"]) == inits.EVA_BATCH for b in batches)
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert bool(((b["labels"] != -100) <= (b["attention_mask"] == 1)).all())  # no answer label on padding


@pytest.mark.parametrize("variant", ["init: eva", "init: eva, use_dora: true", "init: eva_rho_1"])
def test_eva_trains_stores_its_data_pass_and_reloads_with_its_ranks(tiny_neox, tmp_path, variant):
    """On the tiny GPT-NeoX, EVA moves rank between the two blocks' query_key_value; the stored adapter's
    tensors have the ranks its config names, the total rank is what r gave, and plain PEFT reloads it with
    the stored eval loss (with DoRA too: its magnitudes follow the redistributed ranks). rho 1: no layer
    may take more than r, so none moves."""
    f = write(tmp_path, tiny_neox, {"name": "E", "targets": "query_key_value", "variant": variant})
    exp = loralab.load(f)
    e = next(r for r in loralab.run(exp, workspace=tmp_path / "ws").records if r.name == "E")
    assert e.status == "finished" and e.config["lora"]["init"] == variant.split(",")[0].removeprefix("init: ")
    assert e.metrics["init_s"] > 0 and e.metrics["total_s"] >= e.metrics["init_s"] + e.metrics["train_s"]
    cfg = json.loads((tmp_path / "ws" / "runs" / e.id / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(f"{e.adapter_path}/adapter_model.safetensors")
    ranks = {k.split(".lora_A")[0].removeprefix("base_model.model."): v.shape[0] for k, v in tensors.items() if "lora_A" in k}
    assert len(ranks) == 2 and sum(ranks.values()) == 2 * 4  # EVA redistributes r's budget, it does not add to it
    assert all(ranks[name] == cfg["rank_pattern"].get(name, cfg["r"]) for name in ranks)
    assert cfg["eva_config"]["rho"] == (1.0 if "rho_1" in variant else 2.0)
    if "rho_1" in variant:
        assert set(ranks.values()) == {4} and not cfg["rank_pattern"]
    assert reloaded_loss(exp, e) == pytest.approx(e.metrics["eval_loss"], rel=1e-5)
    # Evaluated again (another cap), not trained again: the initialisation's cost comes with the adapter.
    f.write_text(f.read_text().replace("max_new_tokens: 4", "max_new_tokens: [4, 6]"))
    again = next(r for r in loralab.run(loralab.load(f), workspace=tmp_path / "ws").records if r.name == "E")
    assert again.id != e.id and again.timings["train_reused_from"] == e.id
    assert again.metrics["init_s"] == e.metrics["init_s"]
    assert again.metrics["total_s"] >= e.metrics["init_s"] + e.metrics["train_s"] + again.metrics["eval_s"] - 0.01


def test_eva_on_a_4bit_base_trains_and_reloads(wide_llama, tmp_path):  # noqa: F811
    if importlib.util.find_spec("bitsandbytes") is None:  # make test installs it: this fails in CI, not skips
        pytest.fail("bitsandbytes is not installed: pip install 'loralab[qlora]'")
    f = write(tmp_path, f"{{name: {wide_llama}, quantize: {{bits: 4}}}}",
              {"name": "E", "targets": "q_proj, v_proj", "variant": "init: eva"})
    exp = loralab.load(f)
    e = next(r for r in loralab.run(exp, workspace=tmp_path / "ws").records if r.name == "E")
    assert e.status == "finished" and e.metrics["init_s"] > 0
    assert reloaded_loss(exp, e) == pytest.approx(e.metrics["eval_loss"], rel=1e-4)


def test_eva_that_does_not_settle_fails_its_run_and_leaves_the_base_for_the_next(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(inits, "EVA_MAX_PASSES", 1)
    runs = [{"name": "E", "targets": "q_proj, v_proj", "variant": "init: eva"},
            {"name": "W", "targets": "q_proj, v_proj", "variant": "init: default"}]
    result = loralab.run(loralab.load(write(tmp_path, tiny_llama, *runs)), workspace=tmp_path / "ws")
    e, w = (next(r for r in result.records if r.name == n) for n in ("E", "W"))
    assert e.status == "failed" and "did not settle within 1 passes" in e.error and "data.train_size" in e.error
    (tmp_path / "alone").mkdir()
    alone = next(r for r in loralab.run(loralab.load(write(tmp_path / "alone", tiny_llama, runs[1])),
                                        workspace=tmp_path / "alone" / "ws").records if r.name == "W")
    assert w.status == "finished" and w.metrics["eval_loss"] == pytest.approx(alone.metrics["eval_loss"], rel=1e-6)


def test_the_initialisation_is_part_of_the_adapter_identity(tiny_llama, tmp_path):
    from loralab.workspace.store import adapter_identity

    runs = [{"name": n, "targets": "q_proj", "variant": f"init: {i}"} for n, i in (("D", "default"), ("E", "eva"))]
    exp = loralab.load(write(tmp_path, tiny_llama, *runs))
    d, e = (next(r for r in exp.resolved_runs if r.name == n) for n in "DE")
    ids = {adapter_identity({"device": "cpu", "dtype": "float32", "lora": r.lora.model_dump(), "train": r.train.model_dump(),
                             "resolved_target_modules": ["q_proj"]}, {"fingerprint": "m"}, {"fingerprint": "d"})
           for r in (d, e)}
    assert len(ids) == 2 and "init" not in d.lora.model_dump() and e.lora.model_dump()["init"] == "eva"


@pytest.mark.parametrize("model, variant, extra, where, says", [
    ("{tiny}", "init: loftq", "", "runs.L.lora.init", "quantize: {bits: 4}"),
    ("{{name: {tiny}, quantize: {{bits: 8}}}}", "init: loftq", "", "runs.L.lora.init", "8 bits"),
    ("{{name: {tiny}, quantize: {{bits: 4}}}}", "init: loftq", "device: cpu\n", "runs.L.lora.init", "CUDA device only"),
    ("{{name: {tiny}, quantize: {{bits: 4}}}}", "init: loftq, use_dora: true", "device: cuda\n", "runs.L.lora.init",
     "remove use_dora"),
    ("{tiny}", "init: default", "sweep: {strategy: grid, space: {lora.init: [default, loftq]}}\n",
     "sweep.space.lora.init", "quantize: {bits: 4}"),
])
def test_loftq_where_peft_cannot_run_it_is_refused_by_validate_and_run(tiny_llama, tmp_path, model, variant, extra,
                                                                       where, says):
    f = write(tmp_path, model.format(tiny=tiny_llama), {"name": "L", "targets": "q_proj", "variant": variant}, extra=extra)
    for command in (["validate", str(f)], ["run", str(f), "-w", str(tmp_path / "ws")]):
        out = CliRunner().invoke(app, command)
        text = " ".join(out.output.split())
        assert out.exit_code == 2 and where in text and "loftq" in text and says in text, out.output
        assert "another lora.init" in text or "remove use_dora" in text
    assert not (tmp_path / "ws").exists()


@pytest.fixture
def loftq_fit_on_the_cpu(monkeypatch):
    """PEFT's LoftQ fit (dequantize, subtract from the original weight, SVD) hard-codes CUDA; the same fit on
    the CPU, so what loralab does around it (the original weights read from the model's folder, the scaling,
    the adapter stored and reloaded on a 4-bit base) is tested without a GPU. Not a claim that loralab runs
    LoftQ on a CPU: preflight refuses that, and is told here that this is a GPU."""
    import bitsandbytes as bnb
    import peft.utils.loftq_utils as loftq_utils

    from loralab.execute import preflight

    def fit(qweight, weight, num_bits, reduced_rank):
        deq = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state).float()
        out = loftq_utils._low_rank_decomposition(weight.float() - deq, reduced_rank=reduced_rank)
        return out["R"], out["L"]

    monkeypatch.setattr(loftq_utils, "_loftq_init_new", fit)
    monkeypatch.setattr(preflight, "_trains_on_cpu", lambda exp: False)


def test_loftq_starts_nearer_the_original_weights_and_reloads(wide_llama, tmp_path, loftq_fit_on_the_cpu):  # noqa: F811
    """alpha = 2r: without undoing PEFT's missing scaling the start would be base + 2·fit, exactly as far from
    the original weights as the quantized base alone (the fit is the residual's orthogonal projection)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit

    from loralab.execute.runner import restore_base, with_lora

    f = write(tmp_path, f"{{name: {wide_llama}, quantize: {{bits: 4}}}}",
              {"name": "L", "targets": "q_proj, v_proj", "variant": "init: loftq"}, extra="device: cpu\n")
    exp = loralab.load(f)
    prepared = prepare(exp)
    original = load_file(str(wide_llama / "model.safetensors"))
    model = with_lora(prepared, next(r for r in exp.resolved_runs if r.name == "L"))
    try:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
        assert len(layers) == 4
        for name, m in layers:
            w = original[name.removeprefix("base_model.model.") + ".weight"].float()
            deq = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            update = m.scaling["default"] * m.lora_B["default"].weight.detach() @ m.lora_A["default"].weight.detach()
            assert float((w - deq - update).norm()) < 0.99 * float((w - deq).norm())
    finally:
        restore_base(prepared, model)
    rec = next(r for r in loralab.run(exp, workspace=tmp_path / "ws").records if r.name == "L")
    assert rec.status == "finished" and rec.metrics["init_s"] > 0
    assert reloaded_loss(exp, rec) == pytest.approx(rec.metrics["eval_loss"], rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PEFT computes LoftQ on CUDA only (refused on a CPU: above)")
def test_loftq_on_a_4bit_base_trains_and_reloads_on_a_gpu(wide_llama, tmp_path):  # noqa: F811
    f = write(tmp_path, f"{{name: {wide_llama}, quantize: {{bits: 4}}}}",
              {"name": "L", "targets": "q_proj, v_proj", "variant": "init: loftq"}, extra="device: cuda\n")
    exp = loralab.load(f)
    rec = next(r for r in loralab.run(exp, workspace=tmp_path / "ws").records if r.name == "L")
    assert rec.status == "finished" and rec.config["lora"]["init"] == "loftq" and rec.metrics["init_s"] > 0
    assert reloaded_loss(exp, rec) == pytest.approx(rec.metrics["eval_loss"], rel=1e-3)


@pytest.mark.parametrize("given, stored", [("eva_rho_1", "eva_rho_1"), ("eva_rho_1.50", "eva_rho_1.5"),
                                           ("eva_rho_2", "eva"), ("eva_rho_01", "eva_rho_1")])
def test_eva_rho_has_one_spelling_per_value(given, stored):
    """One rho, one adapter id: eva_rho_2 is plain eva (PEFT's rho), leading and trailing zeros go."""
    from loralab.config.schema import LoraSpec

    assert LoraSpec(init=given).init == stored


@pytest.mark.parametrize("init, says", [("eva_rho_0.5", "from 1"), ("eva_rho_17", "to 16"), ("eva_rho_x", "eva_rho_R")])
def test_a_bad_eva_rho_is_one_message(tmp_path, init, says):
    f = tmp_path / "bad.yaml"
    f.write_text(f"name: bad\nruns:\n  A: {{lora: {{init: {init}}}}}\n")
    out = CliRunner().invoke(app, ["validate", str(f)])
    assert out.exit_code == 2 and "runs.A.lora.init" in out.output and says in out.output, out.output


def test_init_is_a_knob_for_sweeps_and_ablations(tmp_path):
    """A grid over lora.init gives trials with each value; an ablation moves init alone, from either end
    (the run at the default init had no `init` in its dump, which the ablation once read B's value from)."""
    from loralab.analysis.ablate import plan
    from loralab.config.space import Space, experiment_start, make_run

    f = tmp_path / "knob.yaml"
    f.write_text("name: knob\nsweep: {strategy: grid, space: {lora.init: [default, eva, eva_rho_1, pissa_niter_2]}}\n"
                 "runs:\n  E: {lora: {r: 4, init: eva}}\n  D: {lora: {r: 8}}\n")
    exp = loralab.load(f)
    start = experiment_start(exp)
    assert [make_run(start, pt, "t").lora.init for pt in Space(exp.sweep).expand()] == ["default", "eva", "eva_rho_1", "pissa_niter_2"]
    for a, b in (("E", "D"), ("D", "E")):
        p = plan(exp, a, b, workspace=tmp_path / "ws")
        assert p.knobs == ["lora.r", "lora.init"]
        moved = next(r for r in p.runs if r.at_b == ["lora.init"])
        ends = {r.name: r.spec for r in p.runs}
        assert moved.spec.lora.init == ends[b].lora.init and moved.spec.lora.r == ends[a].lora.r


def test_a_sweep_dry_run_measures_speed_without_eva_s_data_pass(tiny_llama, tmp_path, monkeypatch):
    """A step trains as fast whatever the start; EVA's pass would cost more than the measurement."""
    from loralab.config.space import experiment_start, make_run
    from loralab.sweep.study import measure_here

    def no_pass(*args, **kwargs):
        raise AssertionError("EVA's data pass ran in a dry run")

    monkeypatch.setattr(inits, "eva_init", no_pass)
    f = write(tmp_path, tiny_llama, {"name": "E", "targets": "q_proj", "variant": "init: eva"},
              extra="sweep: {from: E, strategy: random, space: {lora.r: [2, 4]}, budget: {trials: 2}}\n")
    exp = loralab.load(f)
    start = make_run(experiment_start(exp), {}, "start")
    assert start.lora.init == "eva"
    tps, source, _ = measure_here(exp, prepare(exp), start)
    assert tps > 0 and source.startswith("measured here now")


@pytest.mark.parametrize("variant, train_size, where, says", [
    ("init: eva", 8, "runs.E.lora.init", "8 training example(s) make one batch"),
    ("init: eva_rho_16", 16, "runs.E.lora.r", "rank x rho = 64 components"),
    ("init: eva_rho_4, rank_pattern: {v_proj: 16}", 16, "runs.E.lora.rank_pattern", "rank x rho = 64 components"),
])
def test_eva_that_cannot_run_is_refused_by_validate_and_before_the_model_loads(tiny_llama, tmp_path, variant, train_size,
                                                                            where, says):
    """EVA over one batch of training examples, and EVA fitting more components (r x rho) than a targeted layer
    has inputs (PEFT's IncrementalPCA: "n_components=64 invalid for n_features=32", after the model loaded and
    the base run was evaluated): validate and run refuse them, field, value and fix, exit 2."""
    from typer.testing import CliRunner

    from loralab.cli import app

    f = write(tmp_path, tiny_llama, {"name": "E", "targets": "q_proj, v_proj", "variant": variant})
    f.write_text(f.read_text().replace("train_size: 16", f"train_size: {train_size}"))
    for command in (["validate", str(f)], ["run", str(f), "-w", str(tmp_path / "ws")]):
        out = CliRunner().invoke(app, command)
        text = " ".join(out.output.split())
        assert out.exit_code == 2 and where in text and says in text and "Fix:" in text, out.output
    assert not (tmp_path / "ws").exists()
