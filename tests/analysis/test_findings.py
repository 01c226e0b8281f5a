"""The rules behind "What we learned", on fabricated runs whose effects are known: a strong effect is
stated with its numbers, a null effect reads "no measurable effect … within N seeds", a confound
credits no knob until an ablation measures each, and the TL;DR picks the cheapest run within noise."""

import math
from dataclasses import replace

import pytest

from loralab.analysis.ablate import Effect, knob_effects
from loralab.analysis.comparison import compare
from loralab.analysis.findings import (BELIEFS, Belief, Confound, Importance, belief_finding, confound_findings, decimals,
                              effect_finding, effect_findings, find_confounds, gap_findings, importance_findings,
                              interval, min_trials_for_importance, tldr, training_findings, base_findings)
from loralab.metrics.stats import Verdict
from loralab.workspace.store import RunRecord

N_EXAMPLES = 24
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.05, "target_modules": ["q_proj"], "bias": "none"}
TRAIN = {"learning_rate": 2e-4, "batch_size": 2, "epochs": 1.0, "seed": 0}
GEN = {"max_new_tokens": [50], "batch_size": 16}


def wobble(i: int, seed: int) -> float:
    """Deterministic per-example, per-seed noise in [-0.1, 0.1]: examples differ, seeds differ."""
    return 0.1 * math.sin(1.7 * i + 2.3 * seed + 0.5)


def group(name: str, *, loss_shift: float = 0.0, seeds=(0, 1, 2), lora=None, train=None, gen=None,
          seconds: float = 100.0, per_run: dict | None = None, kind: str = "lora") -> list[RunRecord]:
    """A run with `seeds` records whose per-example eval loss is 2.0 + wobble + loss_shift."""
    out = []
    for seed in seeds:
        samples = [{"id": f"ex{i}", "prompt": f"p{i}", "reference": f"r{i}",
                    "loss": 2.0 + wobble(i, seed) + loss_shift, "outputs": {}} for i in range(N_EXAMPLES)]
        mean_loss = sum(s["loss"] for s in samples) / N_EXAMPLES
        metrics = {"eval_loss": mean_loss, "total_s": seconds + seed, "train_s": seconds - 10 + seed}
        metrics.update({k: v(seed) if callable(v) else v for k, v in (per_run or {}).items()})
        config = {} if kind == "base" else {"lora": {**LORA, **(lora or {})}, "train": {**TRAIN, **(train or {}), "seed": seed},
                                            "generate": {**GEN, **(gen or {})}}
        out.append(RunRecord(id=f"{name}-{seed}", name=name, experiment="fab", kind=kind, status="finished",
                             seed=None if kind == "base" else seed, config=config, model={}, data={}, metrics=metrics,
                             curves={}, samples=samples, env={}, timings={}, adapter_path=None, error=None,
                             created_at="", updated_at=""))
        if kind == "base":
            break
    return out


A = group("A")
A_LR = group("A+lr", loss_shift=-0.5, train={"learning_rate": 5e-4})  # a strong effect, same on every example
A_DROP = group("A+dropout", loss_shift=0.0, lora={"dropout": 0.1}, seeds=(3, 4, 5))  # only noise differs


def only(effects, knob, metric="eval_loss"):
    found = [e for e in effects if e.knob == knob and e.metric == metric]
    assert len(found) == 1, found
    return found[0]


def test_a_strong_effect_is_stated_with_its_numbers():
    effects = knob_effects([A, A_LR, A_DROP], ["eval_loss"])
    e = only(effects, "train.learning_rate")
    assert (e.low, e.high, e.design, e.source) == (2e-4, 5e-4, "pair", "A+lr vs A")
    assert e.verdict.diff == pytest.approx(-0.5) and e.verdict.hi < 0
    f = effect_finding(e)
    assert f.kind == "effect" and f.verdict == "lower"
    assert f.text.startswith("Raising train.learning_rate from 0.0002 to 0.0005 lowered eval loss by 0.500 (better)")
    # It cites its interval, how it was computed, the seeds and the runs.
    assert interval(e.verdict, "f4") in f.text and "95% CI over 3 seeds and 24 eval examples; A+lr vs A" in f.text
    assert "-25%" in f.text  # relative to A's eval loss of about 2.0


def test_a_null_effect_reads_no_measurable_effect_within_n_seeds():
    effects = knob_effects([A, A_LR, A_DROP], ["eval_loss"])
    e = only(effects, "lora.dropout")
    assert e.verdict.lo < 0 < e.verdict.hi  # seeds 3-5 against 0-2: noise only
    f = effect_finding(e)
    assert f.kind == "null" and f.verdict == "within noise"
    assert f.text.startswith("No measurable effect of lora.dropout (0.05 → 0.1) on eval loss within 3 seeds: ")
    assert interval(e.verdict, "f4") in f.text
    # Folded with the knob's other nulls into one sentence, still with every number.
    folded = [x for x in effect_findings(effects) if x.kind == "null"]
    assert len(folded) == 1 and "lora.dropout (0.05 → 0.1) within 3 seeds on: eval loss" in folded[0].text


def test_no_interval_no_claim():
    one = group("A", seeds=(0,), per_run={"loss_spikes": 0.0})
    other = group("A+lr", seeds=(0,), train={"learning_rate": 5e-4}, per_run={"loss_spikes": 3.0})
    e = only(knob_effects([one, other], ["loss_spikes"]), "train.learning_rate", "loss_spikes")
    # One seed each of a per-run number: nothing to test; the difference is kept, with the reason.
    assert e.verdict.label == "untested" and e.verdict.diff == 3.0 and "one seed" in e.verdict.note
    f = effect_finding(e)
    assert f.kind == "untested" and "not tested" in f.text and "repeats: 3" in f.text


def test_one_seed_paired_effects_are_not_stated():
    # Issue 21: one seed is no verdict (identical settings with one seed each differ beyond the eval-example
    # noise about half the time), so a difference beyond it is untested, not an effect.
    one, other = group("A", seeds=(0,)), group("A+lr", seeds=(0,), loss_shift=-0.5, train={"learning_rate": 5e-4})
    f = effect_finding(only(knob_effects([one, other], ["eval_loss"]), "train.learning_rate"))
    assert f.kind == "untested" and "repeats: 3" in f.text


def test_a_confound_credits_no_knob_until_each_is_measured():
    b = group("B", loss_shift=-0.6, lora={"r": 8}, train={"learning_rate": 5e-4}, gen={"max_new_tokens": [100]})
    c = compare([A, b])
    [conf] = find_confounds(c, ["eval_loss"])
    assert (conf.a, conf.b) == ("A", "B")
    assert conf.trained == ["lora.r", "train.learning_rate"] and conf.eval_only == ["generate.max_new_tokens"]
    assert conf.verdicts["eval_loss"].label == "lower"
    found = confound_findings(conf, [], plan_text="`loralab ablate x.yaml A B --design ofat`")
    assert found[0].kind == "confound" and found[0].verdict == "confounded"
    assert found[0].text.startswith("A and B differ in 3 knobs (lora.r (alpha held at 8, so alpha/r moved too: 2 → 1), "
                                    "train.learning_rate, generate.max_new_tokens), "
                                    "so no single knob can be credited with B's differences from A (eval loss -0.600")
    assert "generate.max_new_tokens plays no part in them" in found[0].text
    assert found[1].kind == "plan" and "lora.r, train.learning_rate" in found[1].text and "ablate x.yaml" in found[1].text
    assert not any(f.kind == "credit" for f in found)

    # The one-knob-at-a-time runs: r alone does nothing, lr alone does most of it.
    a_r = group("A+r", lora={"r": 8}, seeds=(3, 4, 5))
    effects = knob_effects([A, a_r, A_LR], ["eval_loss"])
    found = confound_findings(conf, effects)
    assert [f.kind for f in found] == ["confound", "credit"]  # nothing left unmeasured: no plan line
    credit = found[1].text
    assert credit.startswith("Credit for B's eval loss vs A (-0.600 [")
    assert "lora.r " in credit and "(within noise)" in credit and "train.learning_rate -0.500 [" in credit
    assert "] (lower, better)" in credit  # lower eval loss is better
    assert "Together -0.50" in credit and "the rest is interaction between knobs, or noise" in credit


def test_runs_differing_in_one_knob_are_no_confound():
    assert find_confounds(compare([A, A_LR]), ["eval_loss"]) == []
    # One trained knob and a cap: every row compares both runs at the same cap, so lr takes the credit.
    lr_and_cap = group("B", loss_shift=-0.5, train={"learning_rate": 5e-4}, gen={"max_new_tokens": [100]})
    assert find_confounds(compare([A, lr_and_cap]), ["eval_loss"]) == []
    [e] = knob_effects([A, lr_and_cap], ["eval_loss"])
    assert e.knob == "train.learning_rate" and e.verdict.label == "lower"


def test_find_confounds_ignores_the_base_and_the_seed():
    base = group("base", kind="base")
    b = group("B", seeds=(7, 8, 9), train={"learning_rate": 5e-4})  # other seeds, one knob
    assert find_confounds(compare([base, A, b]), ["eval_loss"]) == []


def _effect(knob, low, high, metric, diff, lo, hi, label, design="pair"):
    return Effect(knob, low, high, metric, Verdict(metric, diff, lo, hi, 24, label), 3, 1.0, "paired", "X vs Y", design)


@pytest.mark.parametrize("effect, verdict", [
    # A higher learning rate reaching 90% of its drop in fewer steps: "trains faster" holds.
    (_effect("train.learning_rate", 2e-4, 5e-4, "steps_to_90pct_drop", -8, -12, -4, "lower"), "supported"),
    # Fewer steps when the learning rate went *down*: raising it would slow training, the belief fails.
    (_effect("train.learning_rate", 5e-4, 2e-4, "steps_to_90pct_drop", -8, -12, -4, "lower"), "contradicted"),
    (_effect("train.learning_rate", 2e-4, 5e-4, "steps_to_90pct_drop", 1, -3, 5, "within noise"), "not shown"),
])
def test_beliefs_are_checked_against_measured_effects(effect, verdict):
    belief = BELIEFS[0]
    assert belief.claim == "A higher learning rate trains faster" and belief.source.startswith("the seed report, docs/seed-report/report.md")
    f = belief_finding(belief, [effect])
    assert f.kind == "belief" and f.verdict == verdict
    assert f.text.startswith(f"\u201cA higher learning rate trains faster\u201d (the seed report, docs/seed-report/report.md: "
                             f"Run A vs Run B, which `loralab demo` reruns): {verdict}")
    assert interval(effect.verdict, "f1") in f.text


def test_a_belief_without_a_measurement_is_not_tested():
    f = belief_finding(Belief("More dropout reduces overfitting", "lora.dropout", "generalization_gap", "lower"), [])
    assert f.verdict == "not tested" and "no measured effect of lora.dropout" in f.text


def test_per_cap_beliefs_match_any_cap():
    e = _effect("generate.max_new_tokens", 50, 100, "mean_tokens@100", 12.0, 9.0, 15.0, "higher", "cap")
    f = belief_finding(next(b for b in BELIEFS if b.metric == "mean_tokens"), [e])
    assert f.verdict == "supported" and "mean tokens @100 +12.0 [+9.0, +15.0]" in f.text


def test_tldr_picks_the_cheapest_run_within_noise_of_the_best():
    best = group("B", loss_shift=-0.50, lora={"r": 8}, seconds=200)
    close = group("C", loss_shift=-0.50, lora={"r": 16}, seeds=(3, 4, 5), seconds=120)  # B but for noise, cheaper
    cheap_bad = group("D", loss_shift=+0.30, lora={"r": 2}, seconds=50)  # cheapest, clearly worse
    t = tldr([group("base", kind="base", loss_shift=1.0), best, close, cheap_bad], "eval_loss")
    assert t.best.name == "B" and t.cheapest.name == "C" and t.within_noise == ["C"]
    assert t.sentences[0].startswith("Best eval loss: B, 1.5") and "the untrained base: 3.0" in t.sentences[0]
    assert t.sentences[1].startswith("Cheapest within noise of the best: C, ") and "within noise" in t.sentences[1]
    # Seeds 3-5 take 123-125 s, B's 200-202 s: cheaper by an interval across seeds that excludes zero.
    assert "124 s per run against 201 s, 38% less time: -77 s [" in t.sentences[1] and "CI across seeds" in t.sentences[1]


def test_tldr_claims_no_saving_from_one_wall_time_each():
    """One seed a run: wall time is one measurement each, which machine load moves; the TL;DR compares the
    tokens trained instead, and says so."""
    best = group("B", loss_shift=-0.5, seeds=(0,), seconds=800, per_run={"train_tokens": 2000})
    same_work = group("C", loss_shift=-0.49, seeds=(1,), lora={"r": 16}, seconds=150, per_run={"train_tokens": 2000})
    t = tldr([best, same_work], "eval_loss")
    assert t.cheapest is t.best and "within noise of it, but not measurably cheaper" in t.sentences[1]
    less_work = group("C", loss_shift=-0.49, seeds=(1,), lora={"r": 16}, seconds=900, per_run={"train_tokens": 1000})
    t = tldr([best, less_work], "eval_loss")
    assert t.cheapest.name == "C" and "50% fewer tokens trained" in t.sentences[1]
    assert "wall time is not compared with one seed a run" in t.sentences[1]


def test_tldr_when_the_best_is_also_the_cheapest():
    t = tldr([A_LR, group("D", loss_shift=0.3, lora={"r": 2}, seconds=300)], "eval_loss")
    assert t.cheapest is t.best and "A+lr itself (no other run is within noise of it)" in t.sentences[1]


def test_tldr_with_nothing_finished():
    assert "nothing to recommend" in tldr([group("base", kind="base")], "eval_loss").sentences[0]


def test_importance_sentence_ranks_knobs_with_their_spread_and_disclaims_direction():
    clear = {"eval_loss": [Importance("lora.r", 0.2, 0.1, 0.3), Importance("train.learning_rate", 0.8, 0.7, 0.9)]}
    [f] = importance_findings(clear, 20, 50)
    assert f.text.startswith("In the sweep's 20 completed trials, train.learning_rate mattered most for eval loss")
    assert "train.learning_rate 80% [70%, 90%], lora.r 20% [10%, 30%]" in f.text and "no direction" in f.text
    assert "50 bootstrap resamples of the trials; pruned trials left out" in f.text
    # Overlapping ranges: no knob is named the most important.
    close = {"eval_loss": [Importance("lora.r", 0.45, 0.2, 0.7), Importance("train.learning_rate", 0.55, 0.3, 0.8)]}
    [f] = importance_findings(close, 20, 50)
    assert "no knob clearly mattered most" in f.text and f.knob is None


@pytest.mark.parametrize(("knobs", "need"), [(1, 16), (2, 16), (3, 24), (5, 40)])
def test_importance_needs_eight_trials_a_knob(knobs, need):
    assert min_trials_for_importance(knobs) == need


@pytest.mark.parametrize("values, fmt, expected", [
    ([-0.31, -0.36], "f4", 3),   # the compare table's 3 decimals are enough
    ([0.0003, 0.0001], "f4", 5),  # a small effect keeps two significant digits
    ([12.0, 3.0], "pct", 1),
    ([1024.0], "int", 0),
    ([0.0, 0.0], "f3", 3),
])
def test_decimals_never_hide_an_effect(values, fmt, expected):
    assert decimals(values, fmt) == expected


def test_confound_sentence_when_nothing_differs_beyond_noise():
    conf = Confound("A", "B", ["lora.r", "train.learning_rate"], [], {"eval_loss": Verdict("eval_loss", 0.01, -0.02, 0.04, 24, "within noise")})
    text = confound_findings(conf, [])[0].text
    assert "none of its headline differences is outside the noise" in text


def test_each_run_is_compared_with_the_base_first():
    base = group("base", kind="base", loss_shift=0.5, per_run={"drift_kl": 0.0})
    better = group("A", per_run={"drift_kl": lambda seed: 0.1 + 0.001 * seed})
    [f] = base_findings(compare([base, better]), ["eval_loss", "drift_kl"])
    assert f.kind == "base" and f.verdict == "mixed"
    assert f.text.startswith("A against the untrained base: better on eval loss -0.5")
    assert "worse on KL from base (nats/token) +0.1" in f.text


def test_a_growing_eval_train_gap_is_a_finding():
    a = group("A", per_run={"generalization_gap": lambda seed: 0.12 + 0.01 * seed})
    b = group("B", lora={"r": 8}, seeds=(3, 4, 5), per_run={"generalization_gap": lambda seed: 0.70 + 0.01 * seed})
    [f] = gap_findings(compare([a, b]))
    assert f.text.startswith("B overfits more than A: the eval − train loss gap grew from 0.130 to 0.740")
    assert gap_findings(compare([b, a])) == []  # a smaller gap is no overfitting finding


@pytest.mark.parametrize(("slope", "said"), [(-0.02, True), (0.0, False), (0.01, False)])
def test_a_loss_still_falling_at_the_end_says_train_longer(slope, said):
    runs = [replace(r, curves={"loss": [3.0 + slope * i + 0.01 * math.sin(7 * i + r.seed) for i in range(40)]})
            for r in group("A")]  # 40 steps, flat then a straight line with small wiggles
    found = training_findings([runs])
    assert bool(found) == said
    if said:
        assert found[0].text.startswith("A's training loss was still falling at its last step: -0.020 per step [")
        assert "across 3 seeds" in found[0].text and "Training longer may lower it further" in found[0].text


@pytest.mark.parametrize(("key", "better", "direction"), [
    ("tokens_per_s", "higher", "maximize"),  # once "better higher" in the report and minimised by a sweep
    ("rouge_l@50", "higher", "maximize"), ("eval_loss", "lower", "minimize"), ("mean_tokens@8", None, "minimize"),
])
def test_the_report_and_a_sweep_objective_read_one_direction(key, better, direction):
    from loralab.analysis.findings import better_of
    from loralab.config.schema import ObjectiveSpec

    assert better_of(key) == better and ObjectiveSpec(metric=key).resolved_direction == direction


def test_a_larger_gap_below_zero_is_not_called_overfitting():
    a = group("A", per_run={"generalization_gap": lambda seed: -0.30 + 0.01 * seed})
    b = group("B", lora={"r": 8}, seeds=(3, 4, 5), per_run={"generalization_gap": lambda seed: -0.10 + 0.01 * seed})
    [f] = gap_findings(compare([a, b]))
    assert "overfits" not in f.text and "no sign of overfitting yet" in f.text


def test_a_belief_about_alpha_is_tested_by_the_update_scale():
    e = _effect("lora.alpha/r", 2.0, 4.0, "drift_kl", 0.02, 0.01, 0.03, "higher")
    f = belief_finding(next(b for b in BELIEFS if b.knob == "lora.alpha"), [e])
    assert f.verdict == "supported"


def test_an_interval_the_family_does_not_keep_is_starred():
    from loralab.metrics.stats import MULTIPLE

    v = Verdict("eval_loss", 0.01, 0.004, 0.016, 24, "within noise", "seeds+examples", MULTIPLE, 0.01)
    assert interval(v, "f4").endswith("]*")
    assert not interval(Verdict("eval_loss", 0.01, 0.004, 0.016, 24, "higher"), "f4").endswith("*")


# --- the TL;DR and the findings read the verdicts the table shows --------------------------------


def test_the_tldr_never_calls_a_difference_the_table_calls_within_noise():
    """Today's bug: the table said B vs A "within noise*" (its own interval excludes 0, the column's
    adjustment does not keep it) while the TL;DR said "no other run is within noise of it"."""
    from loralab.metrics.stats import MULTIPLE

    names = ["drift_kl", "loss_spikes", "grad_norm_max", "steps_to_90pct_drop", "loss_final", "peak_mem_mb"]
    starred = 0
    for shift in (0.005, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.03):
        # Six per-run metrics with nothing to find make the column a family of questions.
        a = group("A", per_run={m: (lambda k: lambda seed: 1 + 0.3 * math.sin(1.3 * seed + k))(i) for i, m in enumerate(names)})
        b = group("B", loss_shift=-shift, lora={"r": 8}, seeds=(3, 4, 5),
                  per_run={m: (lambda k: lambda seed: 1 + 0.3 * math.cos(0.7 * seed + k))(i) for i, m in enumerate(names)})
        c = compare([a, b])
        v = c.row("eval_loss").verdicts[0]
        starred += MULTIPLE in v.note
        t = tldr([a, b], "eval_loss", comparison=c)
        assert t.best.name == "B"
        table_close = v.label in ("within noise", "negligible")
        assert (t.within_noise == ["A"]) == table_close, (shift, v, t.sentences)
        if table_close:
            assert "no other run is within noise" not in " ".join(t.sentences)
    assert starred  # the case of the bug was among them: a difference only the adjustment calls noise


def test_the_tldr_adjusts_its_own_questions_when_the_table_does_not_ask_them():
    """Runs the table does not pair with the best (a sweep's trials) are one family of questions."""
    from loralab.analysis.findings import table_verdict

    best = group("B", loss_shift=-0.5, lora={"r": 8})
    c = compare([A, best])
    v = table_verdict(c, "eval_loss", "B", "A")  # the table has B vs A: read the other way round
    assert v.diff == pytest.approx(-c.row("eval_loss").verdicts[0].diff) and v.label == "higher"
    assert table_verdict(c, "eval_loss", "B", "C") is None


# --- the winner's curse ---------------------------------------------------------------------------


def test_a_best_picked_among_many_is_called_optimistic_and_its_confirmation_shown():
    runs = [group(n, loss_shift=s, lora={"r": r}, seeds=(k, k + 1)) for n, s, r, k in
            (("B", -0.5, 8, 0), ("C", -0.2, 16, 3), ("D", 0.1, 2, 6))]
    t = tldr(runs, "eval_loss")
    text = " ".join(t.sentences)
    assert "B was picked as the best of 3 runs" in text and "winner's curse" in text and "fresh seeds" in text
    # A confirmation run (config["confirms"] names the run it retrains on fresh seeds): its value beside the searched one.
    confirm = group("B-confirm", loss_shift=-0.3, lora={"r": 8}, seeds=(50, 51))
    for r in confirm:
        r.config["confirms"] = "B"
    t = tldr(runs + [confirm], "eval_loss")
    assert t.best.name == "B"  # a confirmation is never a candidate itself
    said = next(s for s in t.sentences if s.startswith("Confirmed on fresh seeds"))
    assert "B 1.6" in said and "(2 seeds) against 1.50" in said and "best of 3" in said
    # One run: nothing was picked.
    assert "not flattered" in " ".join(tldr([runs[0]], "eval_loss").sentences)


# --- derived metrics: the eval - train gap ---------------------------------------------------------


def _gapped(name, gaps, *, seeds, spread, phase=0.0, **kw):
    """A run whose seeds' eval - train gaps are `gaps` (nearly equal: the seeds agree), over eval examples
    whose losses spread by `spread`."""
    runs = group(name, seeds=seeds, per_run={"generalization_gap": lambda seed: gaps[seeds.index(seed)]}, **kw)
    for r in runs:
        for i, s in enumerate(r.samples):
            s["loss"] += spread * math.sin(0.9 * i + phase)
        r.metrics["eval_loss"] = sum(s["loss"] for s in r.samples) / len(r.samples)
    return runs


def test_the_gap_interval_holds_both_example_sets_not_only_the_seed_spread():
    """Seen: "lowered overfitting by 0.031 (better)" with [-0.032, -0.030]: two seeds' spread of the gap
    on the same examples, 100x narrower than the eval-loss interval it is built from; both gaps negative."""
    a = _gapped("A", [-0.100, -0.101], seeds=(0, 1), spread=0.8)
    b = _gapped("A+lr", [-0.131, -0.132], seeds=(0, 1), spread=0.8, phase=0.3, train={"learning_rate": 5e-4})
    c = compare([a, b])
    gap, loss = c.row("generalization_gap").verdicts[0], c.row("eval_loss").verdicts[0]
    assert gap.diff == pytest.approx(-0.031)
    assert gap.hi - gap.lo > loss.hi - loss.lo  # it holds the eval-loss noise and the probe's as well
    assert gap.label == "within noise"
    cell = c.row("generalization_gap").cells[0]
    assert cell.lo < cell.mean < cell.hi and cell.hi - cell.lo > 0.1  # a run's gap, too, holds example noise
    [e] = [e for e in knob_effects([a, b], ["generalization_gap"]) if e.metric == "generalization_gap"]
    f = effect_finding(e)
    assert "lowered overfitting" not in f.text and f.kind == "null"


def test_a_gap_below_zero_is_never_called_overfitting():
    v = Verdict("generalization_gap", -0.2, -0.3, -0.1, 24, "lower", "seeds+examples")
    e = Effect("train.learning_rate", 1e-3, 2e-3, "generalization_gap", v, 3, -0.1, "seeds+examples", "B vs A", "pair")
    f = effect_finding(e)
    assert "overfitting (" not in f.text and "(better)" not in f.text and "no overfitting either way" in f.text
    above = Effect("train.learning_rate", 1e-3, 2e-3, "generalization_gap", v, 3, 0.5, "seeds+examples", "B vs A", "pair")
    assert effect_finding(above).text.startswith("Raising train.learning_rate from 0.001 to 0.002 lowered overfitting "
                                                 "(the eval − train loss gap) by 0.200 (better)")


def test_the_gap_verdict_is_not_marked_as_borrowing_seed_noise():
    from loralab.analysis.comparison import fmt_verdict

    a = _gapped("A", [0.100, 0.104], seeds=(0, 1), spread=0.3)
    b = _gapped("B", [0.130, 0.137], seeds=(0, 1), spread=0.3, phase=0.3, lora={"r": 8})
    v = compare([a, b]).row("generalization_gap").verdicts[0]
    assert v.method == "seeds+examples" and "(seed noise assumed)" not in fmt_verdict(v, "f4")


def test_the_tldr_does_not_call_a_run_without_an_interval_clearly_apart():
    one = group("B", seeds=(0,), lora={"r": 8}, per_run={"drift_kl": 0.01})
    other = group("C", seeds=(1,), lora={"r": 16}, per_run={"drift_kl": 0.02})
    t = tldr([one, other], "drift_kl")  # one seed each of a per-run number: no interval
    assert t.best.name == "B" and "C has no interval against it" in t.sentences[1]
    assert "no other run is within noise of it" not in t.sentences[1]


@pytest.mark.parametrize(("verdict", "seeds", "why"), [
    (None, 2, "not measured by both runs"),  # a loss-only trial has no ROUGE-L
    (Verdict("rouge_l@8", math.nan, math.nan, math.nan, 0, "untested", "", "nothing measured on both sides"), 2,
     "not measured by both runs"),
    (Verdict("loss_spikes", 3.0, math.nan, math.nan, 2, "untested", "", "no CI: one seed a run"), 1, "one seed per run"),
])
def test_an_untested_effect_says_why(verdict, seeds, why):
    e = Effect("train.learning_rate", 1e-3, 2e-3, verdict.metric if verdict else "rouge_l@8", verdict, seeds, 1.0, "",
               "B vs A", "pair")
    f = effect_finding(e)
    assert f.kind == "untested" and why in f.text
    assert ("one seed" in f.text) == (why == "one seed per run")


def test_runs_the_table_does_not_pair_with_the_best_are_one_family():
    """A sweep's trials against its best: "within noise of the best?" asked of each is many questions."""
    from loralab.analysis.comparison import verdict_of
    from loralab.analysis.findings import against_best
    from loralab.metrics.stats import MULTIPLE

    best = group("B", loss_shift=-0.3, lora={"r": 8})
    # B but for noise (a little worse, so B stays the best of them)
    twins = [group(f"T{k}", loss_shift=-0.297, lora={"r": 8 + k}, seeds=(10 * k, 10 * k + 1, 10 * k + 2)) for k in (1, 2, 3, 4)]
    adjusted = 0
    for shift in (0.01, 0.0125, 0.015, 0.0175, 0.02):
        near = group("C", loss_shift=-0.3 + shift, lora={"r": 32}, seeds=(3, 4, 5))
        vs = against_best(best, [near] + twins, "eval_loss")
        raw = verdict_of("eval_loss", best, near, 0.95)
        assert vs["C"].diff == raw.diff
        if raw.label == "higher" and vs["C"].label == "within noise":
            assert MULTIPLE in vs["C"].note
            adjusted += 1
        t = tldr([best, near] + twins, "eval_loss")
        assert t.best.name == "B" and ("C" in t.within_noise) == (vs["C"].label in ("within noise", "negligible"))
    assert adjusted  # a difference its own interval calls, the family does not
