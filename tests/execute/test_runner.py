"""End to end on tiny models: the seed's A and B trained, evaluated, stored, reused and compared."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import loralab
from loralab.cli import app
from loralab.analysis.comparison import compare
from loralab.errors import LoralabError, ModelError, SpecError
from loralab.progress import Reporter
from loralab.execute.loop import run_experiment
from loralab.workspace.store import Store

SEED_RUNS = """
runs:
  A:
    lora: {r: 4, alpha: 8, dropout: 0.05, target_modules: [query_key_value]}
    train: {learning_rate: 2.0e-4, batch_size: 2, epochs: 1}
    generate: {max_new_tokens: 5}
  B:
    lora: {r: 8, alpha: 16, dropout: 0.10, target_modules: [query_key_value]}
    train: {learning_rate: 5.0e-4, batch_size: 2, epochs: 1}
    generate: {max_new_tokens: 10}
"""


def experiment(tmp_path: Path, model: Path, runs: str = SEED_RUNS, name: str = "seed", data: str = "") -> Path:
    data = data or "{builtin: stdlib-docstrings, train_size: 8, eval_size: 4}"
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\nmodel: {model}\ndata: {data}\n{runs}")
    return p


@pytest.fixture(scope="module")
def seed_run(tiny_neox, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seed")
    exp = loralab.load(experiment(tmp, tiny_neox))
    console = Console(record=True, width=200)
    result = loralab.run(exp, workspace=tmp / "ws", console=console)
    return exp, result, console.export_text(), tmp


def test_seed_runs_finish_with_metrics_per_cap(seed_run):
    exp, result, _, _ = seed_run
    assert [r.name for r in result.records] == ["base", "A", "B"]
    assert all(r.status == "finished" for r in result.records) and not result.failed
    for r in result.records:
        for cap in (5, 10):
            for key in ("rouge_l", "chrf", "token_f1", "exact_match", "mean_tokens", "median_tokens", "p90_tokens",
                        "length_ratio", "cap_hit_rate", "stop_rate", "repeated_3gram", "distinct_2"):
                assert f"{key}@{cap}" in r.metrics
        for key in ("eval_loss", "eval_ppl", "train_eval_loss", "generalization_gap", "drift_kl", "drift_agreement",
                    "eval_s", "total_s", "eval_tokens"):
            assert key in r.metrics
        assert "cost" not in r.metrics  # no price set: no money shown
        assert r.metrics["mean_tokens@5"] <= 5 and r.metrics["mean_tokens@10"] <= 10
        assert len(r.samples) == 4 and set(r.samples[0]["outputs"]) == {"5", "10"}
    base, a, b = result.records
    assert a.metrics["eval_loss"] != base.metrics["eval_loss"] != b.metrics["eval_loss"]
    assert b.metrics["trainable_params"] == 2 * a.metrics["trainable_params"]  # r 8 vs r 4, same layers
    assert len(a.curves["loss"]) == a.metrics["steps"] == 4  # 8 examples, batch 2, 1 epoch
    assert base.metrics["drift_kl"] == 0.0 and a.metrics["drift_kl"] >= 0.0
    for key in ("loss_spikes", "grad_norm_median", "grad_norm_max", "steps_to_90pct_drop", "final_minus_best",
                "peak_mem_mb", "adapter_bytes", "train_tokens"):
        assert key in a.metrics
    assert a.metrics["total_s"] == pytest.approx(a.metrics["train_s"] + a.metrics["eval_s"], abs=0.02)
    per_example = a.samples[0]["outputs"]["5"]["metrics"]
    assert set(per_example) >= {"rouge_l", "chrf", "tokens", "hit_cap", "stopped"} and "loss" in a.samples[0]
    assert a.env["versions"]["torch"] and a.config["device"] == "cpu" and a.config["dtype"] == "float32"
    assert a.config["lora"]["r"] == 4 and a.data["n_train"] == 8


def test_adapter_is_saved_in_peft_format_and_loads(seed_run, tiny_neox):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, result, _, _ = seed_run
    b = result.records[2]
    folder = Path(b.adapter_path)
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_neox), folder)
    ranks = {m.r["default"] for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    assert ranks == {8}


def test_compare_shows_exactly_the_five_differing_knobs(seed_run):
    _, result, _, _ = seed_run
    c = compare(result.records)
    assert set(c.knobs) == {"lora.r", "lora.alpha", "lora.dropout", "train.learning_rate", "generate.max_new_tokens"}
    assert c.knobs["lora.r"] == [None, 4, 8]
    assert [title for title, _ in c.sections] == ["quality", "verbosity", "drift", "stability", "cost"]
    keys = [r.key for _, rows in c.sections for r in rows]
    assert keys[0] == "eval_loss" and "rouge_l@5" in keys and "cap_hit_rate@10" in keys and "tokens_per_s" in keys
    # Each trained run against the untrained base first, then B against A.
    assert c.verdict_columns == ["A vs base", "B vs base", "B vs A"] and c.column("A", "B") == 2
    # One seed each: per-example metrics get an interval over the eval examples, marked as such; one that
    # excludes 0 is `untested` (issue 21: one seed is no verdict), with no interval.
    v = c.row("eval_loss").verdicts[2]
    assert v is not None and v.n == 4 and v.method == "examples"
    assert v.lo <= v.diff <= v.hi if v.label == "within noise" else v.label == "untested"
    assert "seed noise unmeasured" in v.note
    # One seed per run: no interval for per-run numbers, and the reason is given.
    [_, _, t] = c.row("train_s").verdicts
    assert t.label == "untested" and "one seed" in t.note


def test_difference_answers_is_b_different_from_a(seed_run):
    _, result, _, tmp = seed_run
    v = loralab.difference("A", "B", "eval_loss", workspace=tmp / "ws")
    a, b = result.records[1], result.records[2]
    per_a = {s["id"]: s["loss"] for s in a.samples}
    tokens = {s["id"]: s["loss_tokens"] for s in a.samples}
    diffs = [(s["loss"] - per_a[s["id"]]) * tokens[s["id"]] for s in b.samples]
    # The token-weighted mean of the paired per-example differences: the difference of the stored eval losses.
    assert v.diff == pytest.approx(sum(diffs) / sum(tokens.values()))
    assert v.diff == pytest.approx(b.metrics["eval_loss"] - a.metrics["eval_loss"])
    # One seed each (issue 21): within noise over the eval examples, or untested (no interval) beyond it.
    assert v.label in ("within noise", "untested") and (v.label == "untested") == math.isnan(v.lo)
    assert v.label == "untested" or v.lo <= 0 <= v.hi
    with pytest.raises(SpecError, match="no metric"):
        loralab.difference("A", "B", "happiness", workspace=tmp / "ws")


def test_rerun_reuses_finished_runs_and_force_reruns(seed_run):
    exp, first, _, tmp = seed_run
    again = run_experiment(exp, workspace=tmp / "ws")
    assert again.skipped == ["base", "A", "B"]
    assert [r.id for r in again.records] == [r.id for r in first.records]
    assert [r.metrics for r in again.records] == [r.metrics for r in first.records]  # read back, not re-measured
    forced = run_experiment(exp, workspace=tmp / "ws", only=["A"], force=True)
    assert forced.skipped == [] and [r.name for r in forced.records] == ["base", "A"]
    # Same config and seed on CPU: the same numbers.
    assert forced.records[1].metrics["eval_loss"] == first.records[1].metrics["eval_loss"]
    assert forced.records[1].curves["loss"] == first.records[1].curves["loss"]


def test_run_id_depends_on_config_not_name(seed_run, tiny_neox, tmp_path):
    _, first, _, _ = seed_run
    renamed = SEED_RUNS.replace("  A:", "  first:")
    exp = loralab.load(experiment(tmp_path, tiny_neox, renamed))
    from loralab.execute.identity import run_id
    from loralab.execute.prepare import prepare

    p = prepare(exp)
    assert run_id(p, exp.run("first")) == first.records[1].id


def test_runs_of_other_max_seq_len_get_their_own_encoded_examples(tiny_neox, tmp_path):
    """The training examples are encoded once per max_seq_len and shared by the runs (and sweep trials) of that
    length; a run with another length gets examples truncated at its own."""
    from loralab.engine.data import encode_example
    from loralab.execute.prepare import prepare
    from loralab.execute.runner import train_encoded

    runs = SEED_RUNS.replace("batch_size: 2, epochs: 1}\n    generate: {max_new_tokens: 10}",
                             "batch_size: 2, epochs: 1, max_seq_len: 24}\n    generate: {max_new_tokens: 10}")
    data = "{builtin: stdlib-docstrings, train_size: 8, eval_size: 4, truncate: true}"
    exp = loralab.load(experiment(tmp_path, tiny_neox, runs, data=data))
    p = prepare(exp)
    a, b = exp.run("A"), exp.run("B")
    assert b.train.max_seq_len == 24 != a.train.max_seq_len
    tok, system = p.base.tokenizer, p.dataset.system_prompt
    for run in (a, b, a):
        fresh = [encode_example(tok, ex, system, run.train.max_seq_len) for ex in p.dataset.train]
        assert train_encoded(p, run) == fresh
        assert train_encoded(p, run, 3) == fresh[:3]
    assert max(len(e.input_ids) for e in train_encoded(p, b)) <= 24 < max(len(e.input_ids) for e in train_encoded(p, a))
    assert train_encoded(p, a) is not train_encoded(p, a)  # a copy: a caller's list cannot change the shared one
    assert train_encoded(p, a)[0] is train_encoded(p, a)[0]  # encoded once


def test_fused_alias_is_mapped_on_llama_and_said_once(tiny_llama, tmp_path):
    exp = loralab.load(experiment(tmp_path, tiny_llama))
    console = Console(record=True, width=200)
    result = loralab.run(exp, workspace=tmp_path / "ws", console=console, only=["A"])
    text = console.export_text()
    assert text.count("using its attention projections q_proj, k_proj, v_proj") == 1
    assert result.records[1].config["resolved_target_modules"] == ["q_proj", "k_proj", "v_proj"]


def test_trial_isolation_run_after_another_equals_run_alone(tiny_llama, tmp_path):
    same_caps = SEED_RUNS.replace("max_new_tokens: 5", "max_new_tokens: 10")
    alone = loralab.run(loralab.load(experiment(tmp_path, tiny_llama, same_caps)), workspace=tmp_path / "w1", only=["A"])
    a_block, b_block = same_caps.split("  B:")
    swapped = "runs:\n  B:" + b_block + a_block.replace("runs:\n", "")  # B trains first, then A
    after = loralab.run(loralab.load(experiment(tmp_path, tiny_llama, swapped, name="swapped")), workspace=tmp_path / "w2")
    a_alone = alone.records[1]
    a_after = next(r for r in after.records if r.id == a_alone.id)
    assert after.records.index(a_after) == 2  # it really ran second, after another adapter came and went
    assert a_after.metrics["eval_loss"] == a_alone.metrics["eval_loss"]
    assert a_after.curves["loss"] == a_alone.curves["loss"]
    untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("_s")}  # noqa: E731
    assert untimed(after.records[0].metrics) == untimed(alone.records[0].metrics)  # the base was untouched


def test_ctrl_c_marks_the_run_interrupted_and_keeps_finished_ones(tiny_neox, tmp_path, monkeypatch):
    import loralab.engine.train as train_mod

    real = train_mod.train_lora

    def interrupted(model, examples, spec, **kw):
        if spec.learning_rate == 5e-4:  # run B
            raise KeyboardInterrupt
        return real(model, examples, spec, **kw)

    monkeypatch.setattr(train_mod, "train_lora", interrupted)
    exp = loralab.load(experiment(tmp_path, tiny_neox))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, workspace=tmp_path / "ws")
    store = Store(tmp_path / "ws")
    status = {r.name: r.status for r in store.list()}
    assert status == {"base": "finished", "A": "finished", "B": "interrupted"}
    assert not (store.run_dir(store.find("B").id) / "adapter").exists()
    monkeypatch.setattr(train_mod, "train_lora", real)
    again = run_experiment(exp, workspace=tmp_path / "ws")
    assert again.skipped == ["base", "A"] and again.records[2].status == "finished"


def test_a_failing_run_is_stored_as_failed_and_the_next_still_runs(tiny_neox, tmp_path, monkeypatch):
    import loralab.engine.train as train_mod

    real = train_mod.train_lora

    def broken(model, examples, spec, **kw):
        if spec.learning_rate == 2e-4:  # run A
            raise RuntimeError("boom")
        return real(model, examples, spec, **kw)

    monkeypatch.setattr(train_mod, "train_lora", broken)
    result = run_experiment(loralab.load(experiment(tmp_path, tiny_neox)), workspace=tmp_path / "ws")
    assert result.failed == ["A"]
    assert [r.status for r in result.records] == ["finished", "failed", "finished"]
    assert "boom" in result.records[1].error


@pytest.mark.parametrize("runs, data, error", [
    (SEED_RUNS.replace("[query_key_value]", "[nope_proj]"), "", ModelError),
    (SEED_RUNS, "{path: missing.jsonl}", SpecError),
    (SEED_RUNS, "{path: empty.jsonl}", LoralabError),
])
def test_bad_input_writes_nothing(tiny_neox, tmp_path, runs, data, error):
    (tmp_path / "empty.jsonl").write_text("")
    exp = loralab.load(experiment(tmp_path, tiny_neox, runs, data=data))
    with pytest.raises(error):
        run_experiment(exp, workspace=tmp_path / "ws")
    assert not (tmp_path / "ws").exists()


def test_unknown_only_name_writes_nothing(tiny_neox, tmp_path):
    exp = loralab.load(experiment(tmp_path, tiny_neox))
    with pytest.raises(SpecError, match="--only"):
        run_experiment(exp, workspace=tmp_path / "ws", only=["Z"])
    assert not (tmp_path / "ws").exists()


def test_repeats_pool_seeds_into_means_with_intervals(tiny_neox, tmp_path):
    runs = "repeats: 2\ncost: {per_hour: 3.6, currency: EUR}\nevaluation: {drift: false}\n" + SEED_RUNS
    result = loralab.run(loralab.load(experiment(tmp_path, tiny_neox, runs)), workspace=tmp_path / "ws")
    groups = result.groups()
    assert [r.seed for r in groups["A"]] == [0, 1] and [r.seed for r in groups["B"]] == [0, 1]
    assert len({r.id for r in groups["A"]}) == 2  # the seed is part of the run id
    assert groups["A"][0].curves["loss"] != groups["A"][1].curves["loss"]
    a0 = groups["A"][0]
    assert a0.metrics["cost"] == pytest.approx(a0.metrics["total_s"] / 3600 * 3.6, rel=1e-3)
    assert "drift_kl" not in a0.metrics
    c = compare(list(groups.values()))
    est = c.row("eval_loss").cells[1]
    assert est.n == 2 and est.lo < est.mean < est.hi
    assert c.knobs["seeds"] == [None, [0, 1], [0, 1]]
    # Two seeds each: an interval for per-run numbers across seeds.
    assert c.row("train_s").verdicts[c.column("A", "B")].method == "seeds"
    assert c.currency == "EUR"
    # The store gives back the whole group by name.
    store = Store(tmp_path / "ws")
    assert [r.seed for r in store.group("B")] == [0, 1]


def diverging_experiment(tmp_path: Path) -> Path:
    """A file whose run A must diverge on any CPU, B not: A's update is scaled by alpha/r = 16384 with
    no gradient clipping, so its logits leave any range that a kernel's rounding could keep finite or
    small (lr 0.9 with alpha/r 16 diverged with AVX2 kernels and not with AVX-512 ones)."""
    from tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "wild", arch="gpt_neox", initializer_range=1.0)
    runs = SEED_RUNS.replace("learning_rate: 2.0e-4, batch_size: 2, epochs: 1",
                             "learning_rate: 0.9, batch_size: 1, max_steps: 40, max_grad_norm: null")
    runs = runs.replace("r: 4, alpha: 8, dropout: 0.05, target_modules: [query_key_value]",
                        "r: 4, alpha: 65536, dropout: 0.05, target_modules: all-linear")
    return experiment(tmp_path, model, runs, data="{builtin: stdlib-docstrings, train_size: 40, eval_size: 4}")


def test_a_diverging_run_stops_early_is_diagnosed_and_the_next_run_completes(tmp_path):
    exp = loralab.load(diverging_experiment(tmp_path))
    result = loralab.run(exp, workspace=tmp_path / "ws")
    a, b = result.records[1], result.records[2]
    assert result.diverged == ["A"]
    assert a.status == "diverged" and b.status == "finished"
    step = a.metrics["diverged_step"]
    assert step < 40 and a.metrics["saved_steps"] == 40 - step
    losses = a.curves["loss"]
    # Stopped at the step that went bad, with every step before it finite.
    assert len(losses) == step and all(math.isfinite(x) for x in losses[:-1])
    assert not math.isfinite(losses[-1]) or sum(losses[-5:]) / 5 > 2 * losses[0]
    assert "learning_rate 0.9" in a.error and "alpha/r = 16384" in a.error and "last good loss" in a.error
    assert a.adapter_path is None
    again = run_experiment(exp, workspace=tmp_path / "ws")
    assert again.skipped == ["base", "A", "B"]  # a diverged run is an outcome, not retried


def test_markdown_cells_cannot_break_the_table(seed_run):
    from loralab.analysis.comparison import Comparison, _md_cell, to_markdown

    assert _md_cell("a | b\nc") == "a \\| b c"
    assert _md_cell("a\r\nb\rc") == "a b c"  # a bare carriage return breaks a table row too
    _, result, _, _ = seed_run
    a = replace(result.records[1], name="A|<script>")
    md = to_markdown(compare([a]))
    header = md.splitlines()[0]
    assert header.count(" | ") == 1 and "A\\|<script>" in header and isinstance(compare([a]), Comparison)


def test_every_stored_metric_has_a_row_in_the_metric_table(seed_run):
    from loralab.metrics.table import metric

    _, result, _, _ = seed_run
    keys = {k for r in result.records for k in r.metrics}
    assert keys and not [k for k in keys if metric(k) is None]


# -- adapter identity: evaluation settings re-evaluate stored adapters, they never retrain ------------

ONE_RUN = """evaluation: {{drift: false}}
runs:
  A:
    lora: {{r: 4, alpha: 8, target_modules: [query_key_value]}}
    train: {{learning_rate: 2.0e-4, batch_size: 2, max_steps: 2}}
    generate: {{max_new_tokens: {caps}, batch_size: {batch}}}
"""
SMALL_DATA = "{builtin: stdlib-docstrings, train_size: 4, eval_size: 2}"


def refuse_training(monkeypatch) -> list:
    """train.train_lora replaced by one that counts calls and fails: a run that trains ends `failed`."""
    import loralab.engine.train as train_mod

    calls = []

    def refuse(*args, **kw):
        calls.append(1)
        raise AssertionError("trained, but only the evaluation changed")

    monkeypatch.setattr(train_mod, "train_lora", refuse)
    return calls


@pytest.fixture
def no_training(monkeypatch):
    return refuse_training(monkeypatch)


def one_run(tmp_path: Path, model: Path, caps: str = "[5]", batch: int = 16) -> "loralab.Experiment":
    return loralab.load(experiment(tmp_path, model, ONE_RUN.format(caps=caps, batch=batch), name="ident",
                                   data=SMALL_DATA))


@pytest.fixture
def trained_once(tiny_neox, tmp_path):
    """A workspace holding run A trained and evaluated at cap 5."""
    first = run_experiment(one_run(tmp_path, tiny_neox), workspace=tmp_path / "ws")
    assert first.records[1].status == "finished"
    return first.records[1]


def assert_evaluated_from(rec, trained) -> None:
    """`rec` is a new row whose adapter is `trained`'s, evaluated anew, its training carried over."""
    assert rec.status == "finished" and rec.id != trained.id
    assert rec.timings["train_reused_from"] == trained.id and rec.timings["train_s"] == 0.0
    for key in ("steps", "train_s", "train_loss_final", "trainable_params", "adapter_bytes"):
        assert rec.metrics[key] == trained.metrics[key]
    assert rec.curves == trained.curves
    assert rec.metrics["total_s"] == pytest.approx(rec.metrics["train_s"] + rec.metrics["eval_s"], abs=0.02)
    # The same weights, evaluated the same way: the same loss (the adapter was loaded, not trained again).
    assert rec.metrics["eval_loss"] == pytest.approx(trained.metrics["eval_loss"], rel=1e-6)
    folder = Path(rec.adapter_path)
    assert folder.parent.name == rec.id and (folder / "adapter_model.safetensors").is_file()


def test_adding_a_cap_evaluates_the_stored_adapter_and_trains_nothing(trained_once, tiny_neox, tmp_path, no_training):
    again = run_experiment(one_run(tmp_path, tiny_neox, caps="[5, 7]"), workspace=tmp_path / "ws")
    a = again.records[1]
    assert no_training == [] and again.failed == [] and again.skipped == []
    assert_evaluated_from(a, trained_once)
    assert "rouge_l@7" in a.metrics and "rouge_l@5" in a.metrics and set(a.samples[0]["outputs"]) == {"5", "7"}
    shown = CliRunner().invoke(app, ["show", "A", "-w", str(tmp_path / "ws")], terminal_width=200)
    assert shown.exit_code == 0 and f"trained as run {trained_once.id}" in shown.output
    # The new row is stored like any other: a rerun of the same file takes it as it is.
    third = run_experiment(one_run(tmp_path, tiny_neox, caps="[5, 7]"), workspace=tmp_path / "ws")
    assert third.skipped == ["base", "A"] and third.records[1].id == a.id


def test_changing_generate_batch_size_evaluates_the_stored_adapter_and_trains_nothing(trained_once, tiny_neox,
                                                                                      tmp_path, no_training):
    again = run_experiment(one_run(tmp_path, tiny_neox, batch=1), workspace=tmp_path / "ws")
    assert no_training == [] and again.failed == []
    assert_evaluated_from(again.records[1], trained_once)


def test_evaluating_a_stored_adapter_leaves_the_base_model_bare(trained_once, tiny_neox, tmp_path, no_training):
    from loralab.execute.prepare import prepare
    from loralab.execute.runner import train_run

    exp = one_run(tmp_path, tiny_neox, caps="[6]")
    p = prepare(exp)
    before = {k: v.clone() for k, v in p.base.model.state_dict().items()}
    store = Store(tmp_path / "ws")
    try:
        status, reused = train_run(p, exp.run("A"), store, experiment=exp.name)
    finally:
        store.close()
    assert (status, reused) == ("finished", False) and no_training == []
    assert not hasattr(p.base.model, "peft_config") and not any("lora" in n for n, _ in p.base.model.named_modules())
    after = p.base.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_force_retrains_even_when_the_adapter_is_stored(trained_once, tiny_neox, tmp_path, no_training):
    again = run_experiment(one_run(tmp_path, tiny_neox, caps="[5, 7]"), workspace=tmp_path / "ws", force=True)
    assert no_training == [1] and again.failed == ["A"]


def test_an_old_workspace_is_migrated_in_place_and_its_adapters_are_evaluated_not_retrained(trained_once, tiny_neox,
                                                                                            tmp_path, no_training):
    from loralab.workspace.doctor import check_workspace
    from tiny import downgrade_to_schema_2

    ws = tmp_path / "ws"
    downgrade_to_schema_2(ws / "loralab.db")
    old = Store(ws, create=False)  # read-only commands (ls, show, report, doctor) read schema 2 as it is
    try:
        assert {r.name: r.status for r in old.list()} == {"base": "finished", "A": "finished"}
    finally:
        old.close()
    assert check_workspace(ws).ok and schema_version(ws) == 2
    again = run_experiment(one_run(tmp_path, tiny_neox, caps="[5, 7]"), workspace=ws)
    assert schema_version(ws) == 4 and no_training == [] and again.failed == []
    assert_evaluated_from(again.records[1], trained_once)
    report = check_workspace(ws)
    assert report.ok and report.findings == [] and report.runs == 4


def schema_version(ws: Path) -> int:
    import sqlite3

    with sqlite3.connect(ws / "loralab.db") as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def test_a_diverged_adapter_is_not_trained_again_for_a_new_cap(tmp_path, monkeypatch):
    path = diverging_experiment(tmp_path)
    first = run_experiment(loralab.load(path), workspace=tmp_path / "ws")
    assert first.diverged == ["A"]
    no_training = refuse_training(monkeypatch)
    path.write_text(path.read_text().replace("max_new_tokens: 5}", "max_new_tokens: [5, 6]}"))
    again = run_experiment(loralab.load(path), workspace=tmp_path / "ws")
    a, b = again.records[1], again.records[2]
    assert no_training == [] and again.diverged == ["A"] and b.status == "finished"
    assert a.id != first.records[1].id and a.timings["train_reused_from"] == first.records[1].id
    assert a.metrics["diverged_step"] == first.records[1].metrics["diverged_step"] and a.error == first.records[1].error
    assert "rouge_l@6" in b.metrics
