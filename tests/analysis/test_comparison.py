"""The main table's promise: a cell and its verdict compute the same quantity, every interval holds seed
and eval-example noise, and runs that differ only in their seeds are never called different."""

from __future__ import annotations

import math

import pytest

import loralab
from loralab.analysis.comparison import verdict_of, cell_estimate, compare, fmt_verdict, to_markdown
from loralab.workspace.store import RunRecord

N = 12


def record(name: str, seed: int | None, losses: list[float], tokens: list[int], *, kind: str = "lora",
           per_run: dict | None = None, min_effect: dict | None = None) -> RunRecord:
    """A stored run whose eval loss is the token-weighted mean of its per-example losses, as training stores it."""
    samples = [{"id": f"ex{i}", "loss": x, "loss_tokens": n, "outputs": {}} for i, (x, n) in enumerate(zip(losses, tokens))]
    loss = sum(x * n for x, n in zip(losses, tokens)) / sum(tokens)
    config = {} if kind == "base" else {"lora": {"r": 4, "alpha": 8.0}, "train": {"learning_rate": 2e-4, "seed": seed},
                                        "generate": {"max_new_tokens": [8]},
                                        "evaluation": {"min_effect": min_effect or {}}}
    return RunRecord(id=f"{name}-{seed}", name=name, experiment="x", kind=kind, status="finished", seed=seed,
                     config=config, model={}, data={}, metrics={"eval_loss": loss, "eval_ppl": math.exp(loss),
                                                                **(per_run or {})},
                     curves={}, samples=samples, env={}, timings={}, adapter_path=None, error=None, created_at="",
                     updated_at="")


TOKENS = [1, 9, 2, 8, 3, 7, 4, 6, 5, 5, 10, 1]  # long and short answers: weighting matters


def run(name: str, shift: float, seeds=(0, 1, 2), **kw) -> list[RunRecord]:
    return [record(name, s, [2.0 + shift + 0.3 * math.sin(i) + 0.05 * math.cos(3 * i + s) for i in range(N)], TOKENS, **kw)
            for s in seeds]


def test_the_eval_loss_verdict_is_the_difference_of_its_cells():
    a, b = run("A", 0.0), run("B", -0.2, seeds=(5, 6, 7))
    c = compare([a, b])
    row = c.row("eval_loss")
    # Cells are the stored, token-weighted eval losses; the verdict is token-weighted too.
    assert row.verdicts[0].diff == pytest.approx(row.cells[1].mean - row.cells[0].mean, abs=1e-12)
    unweighted = sum(s["loss"] for r in b for s in r.samples) / (3 * N) - sum(s["loss"] for r in a for s in r.samples) / (3 * N)
    assert row.verdicts[0].diff != pytest.approx(unweighted, abs=1e-6)  # the weights changed the number


def test_perplexity_and_loss_never_disagree():
    a = run("A", 0.0)
    for shift in (-0.3, -0.01, 0.0, 0.02, 0.3):
        c = compare([a, run("B", shift, seeds=(5, 6, 7))])
        loss, ppl = c.row("eval_loss"), c.row("eval_ppl")
        assert loss.verdicts[0].label == ppl.verdicts[0].label
        assert math.copysign(1, loss.verdicts[0].diff) == math.copysign(1, ppl.verdicts[0].diff) or shift == 0.0
        assert ppl.cells[1].mean == pytest.approx(math.exp(loss.cells[1].mean))  # the cell is exp of the loss cell


def test_every_trained_run_is_compared_with_base_and_with_the_first_run():
    base = [record("base", None, [3.0 + 0.3 * math.sin(i) for i in range(N)], TOKENS, kind="base")]
    c = compare([base, run("A", 0.0), run("B", -0.2, seeds=(5, 6, 7))])
    assert c.verdict_columns == ["A vs base", "B vs base", "B vs A"]
    assert c.row("eval_loss").verdicts[0].label == "lower"  # fine-tuning beat the base
    # Base given last: still a column against it.
    small = compare([run("small", 0.0), base])
    assert small.verdict_columns == ["small vs base"] and small.row("eval_loss").verdicts[0].diff < 0


def test_one_seed_per_run_says_why_instead_of_a_blank_cell():
    a = run("A", 0.0, seeds=(0,), per_run={"drift_kl": 0.1})
    b = run("B", -0.2, seeds=(1,), per_run={"drift_kl": 0.2})
    c = compare([a, b])
    assert fmt_verdict(c.row("drift_kl").verdicts[0], "f4") == "+0.100 (no CI)"
    loss = c.row("eval_loss").verdicts[0]
    assert loss.method == "examples" and fmt_verdict(loss, "f4").endswith("(1 seed)")
    md = to_markdown(c)
    assert "Seed noise unmeasured (one seed)" in md and "`repeats: 3` measures it" in md
    assert "No CI: one seed a run gives a per-run number no interval" in md


def test_a_difference_inside_min_effect_is_negligible():
    a = run("A", 0.0, min_effect={"eval_loss": 0.5})
    b = run("B", -0.2, seeds=(5, 6, 7))
    v = compare([a, b]).row("eval_loss").verdicts[0]
    assert v.label == "negligible"
    assert compare([run("A", 0.0), b]).row("eval_loss").verdicts[0].label == "lower"
    assert "evaluation.min_effect: eval_loss 0.5" in to_markdown(compare([a, b]))


def test_a_cell_interval_holds_eval_example_noise_too():
    # Three identical seeds: no seed spread, but the eval set is a sample: the interval is not zero width.
    a = [record("A", s, [2.0 + 0.3 * math.sin(i) for i in range(N)], TOKENS) for s in (0, 1, 2)]
    e = cell_estimate("eval_loss", a, 0.95)
    assert e.hi - e.lo > 0.1


def test_a_run_without_token_counts_is_compared_unweighted_and_says_so():
    a, b = run("A", 0.0), run("B", -0.2, seeds=(5, 6, 7))
    for r in a + b:
        for s in r.samples:
            del s["loss_tokens"]
    v = verdict_of("eval_loss", a, b, 0.95)
    assert "unweighted" in v.note


# --- the case, trained: identical settings, different seeds --------------------------------


IDENTICAL = """
repeats: 3
runs:
  A:
    lora: {r: 4, alpha: 8, dropout: 0.05, target_modules: [q_proj, v_proj]}
    train: {learning_rate: 2.0e-3, batch_size: 2, max_steps: 12, seed: 0}
    generate: {max_new_tokens: 8}
  B:
    lora: {r: 4, alpha: 8, dropout: 0.05, target_modules: [q_proj, v_proj]}
    train: {learning_rate: 2.0e-3, batch_size: 2, max_steps: 12, seed: 10}
    generate: {max_new_tokens: 8}
"""


def test_identical_settings_with_other_seeds_are_within_noise_on_every_metric(tiny_llama, tmp_path):
    f = tmp_path / "same.yaml"
    f.write_text(f"name: same\nmodel: {tiny_llama}\ndata: {{builtin: stdlib-docstrings, train_size: 24, eval_size: 12}}\n"
                 + IDENTICAL)
    loralab.run(loralab.load(f), workspace=tmp_path / "ws")
    c = loralab.compare(["A", "B"], tmp_path / "ws")
    assert c.verdict_columns == ["B vs A"]
    called = {r.key: r.verdicts[0].label for _, rows in c.sections for r in rows
              if r.verdicts[0] is not None and r.verdicts[0].label in ("higher", "lower")}
    # Timings depend on the machine's load, and peak memory on a CPU is the process's RSS, which grows with what
    # the process ran before (B's seeds run after A's), not on the settings; everything the settings decide is
    # within noise.
    machine = {"tokens_per_s", "peak_mem_mb"}
    assert not {k: v for k, v in called.items() if not k.endswith("_s") and k not in machine}, called
    assert c.row("eval_loss").verdicts[0].method == "seeds+examples"


def test_the_base_is_a_fixed_point_for_its_scores_but_not_for_its_times():
    base = [record("base", None, [3.0 + 0.3 * math.sin(i) for i in range(N)], TOKENS, kind="base",
                   per_run={"eval_s": 40.0, "drift_kl": 0.0})]
    a = run("A", 0.0, per_run={"eval_s": 80.0, "drift_kl": 0.1})
    for r, dt in zip(a, (-1.0, 0.0, 1.0)):
        r.metrics["eval_s"] += dt
        r.metrics["drift_kl"] += dt / 100
    c = compare([base, a])
    drift = c.row("drift_kl").verdicts[0]
    assert drift.note == "" and drift.method == "seeds"  # base drift is 0 by definition: one-sample interval
    # A's evaluation ran the drift passes the base skips: its eval time holds more work, so it is not compared.
    assert c.row("eval_s").verdicts[0].label == "untested" and "not compared" in c.row("eval_s").verdicts[0].note
    for r in base + a:
        del r.metrics["drift_kl"]
    time_ = compare([base, a]).row("eval_s").verdicts[0]
    assert "seed noise taken as the other's" in time_.note  # one timing of the base: as noisy as A's
    assert time_.hi - time_.lo > drift.hi - drift.lo


def test_perplexity_and_shares_show_the_interval_they_have():
    """Seen: "76.76 ± 41.16" for a perplexity whose interval is [45.9, 128.3] (exp of the loss interval),
    and a share "4% ± 53%" whose interval runs below 0%."""
    from loralab.analysis.comparison import fmt_estimate
    from loralab.metrics.stats import Estimate

    loss = Estimate(math.log(76.76), math.log(45.92), math.log(128.31), 2)
    ppl = Estimate(math.exp(loss.mean), math.exp(loss.lo), math.exp(loss.hi), 2)
    assert fmt_estimate(ppl, "f2") == "76.76 [45.92, 128.31]"
    assert fmt_estimate(loss, "f4").startswith("4.3407 ± ")  # the loss interval is symmetric: ± stays
    assert fmt_estimate(Estimate(0.04, -0.49, 0.57, 2), "pct") == "4% [0%, 57%]"  # a share lies in [0, 1]
    assert fmt_estimate(Estimate(0.5, 0.4, 0.6, 2), "pct") == "50% ± 10%"
    # The table's perplexity cell is exp of the loss cell, shown with its own (asymmetric) bounds.
    a = run("A", 0.0)
    cell = compare([a]).row("eval_ppl").cells[0]
    text = to_markdown(compare([a]))
    assert f"{cell.mean:.2f} [{cell.lo:.2f}, {cell.hi:.2f}]" in text
    # A difference of shares lies in [-100, +100] points.
    from loralab.metrics.stats import Verdict

    v = Verdict("cap_hit_rate@8", 0.792, 0.178, 1.405, 12, "higher", "seeds+examples")
    assert fmt_verdict(v, "pct") == "+79.200 pp [+17.800, +100.000] higher"
