"""Like with like: runs evaluated differently (a loss-only sweep trial, a fully evaluated run, the
untrained base) are never compared on what one of them did not measure, nor on times that hold different
work; and the first finding says plainly whether any run answered better than the base, not only on loss."""

import math

from loralab.analysis.ablate import knob_effects
from loralab.analysis.comparison import compare, to_markdown
from loralab.analysis.findings import effect_findings, tldr
from loralab.workspace.store import RunRecord

N = 16
CAPS = (8, 16)
ANSWERS = ("rouge_l", "token_f1", "chrf", "exact_match")


def run(name: str, seeds=(0, 1), *, kind: str = "lora", lr: float = 1e-3, answers: dict | None = None,
        train_s: float = 30.0, eval_s: float = 40.0, loss_shift: float = 0.0) -> list[RunRecord]:
    """A stored run. `answers`: metric -> shift of its per-example score (fully evaluated, caps 8 and 16);
    None: evaluated on its losses only, as a sweep trial with `evaluate: auto`."""
    out = []
    for seed in seeds:
        samples = []
        for i in range(N):
            s = {"id": f"ex{i}", "loss": 2.0 + loss_shift + 0.2 * math.sin(1.3 * i + seed), "loss_tokens": 5, "outputs": {}}
            if answers is not None:
                for cap in CAPS:
                    m = {k: min(1.0, max(0.0, 0.4 + answers.get(k, 0.0) + 0.1 * math.sin(2.1 * i + 0.7 * seed + cap)))
                         for k in ANSWERS if k != "exact_match"}
                    m["exact_match"] = float((i + seed) % 4 == 0)
                    s["outputs"][str(cap)] = {"text": "x", "tokens": 3, "stopped": True, "metrics": m}
            samples.append(s)
        metrics = {"eval_loss": sum(s["loss"] for s in samples) / N, "eval_s": eval_s + 0.3 * seed}
        if kind != "base":
            metrics.update({"train_s": train_s + 0.3 * seed, "init_s": 0.0})
        metrics["total_s"] = metrics.get("train_s", 0.0) + metrics["eval_s"]
        if answers is not None:
            for cap in CAPS:
                for k in ANSWERS:
                    metrics[f"{k}@{cap}"] = sum(s["outputs"][str(cap)]["metrics"][k] for s in samples) / N
        config = {} if kind == "base" else {"lora": {"r": 4, "alpha": 8.0}, "train": {"learning_rate": lr, "seed": seed},
                                            "generate": {"max_new_tokens": list(CAPS)}}
        out.append(RunRecord(id=f"{name}-{seed}", name=name, experiment="x", kind=kind, status="finished",
                             seed=None if kind == "base" else seed, config=config, model={}, data={}, metrics=metrics,
                             curves={}, samples=samples, env={}, timings={}, adapter_path=None, error=None,
                             created_at="", updated_at=""))
        if kind == "base":
            break
    return out


def test_a_loss_only_trial_and_a_full_run_compare_train_time_not_total_time():
    """The new user's report: "Raising train.learning_rate ... lowered total time by 31.9 s (-47%)": the
    trial's 2.5 s of loss-only evaluation against the full run's 38.6 s, training the same."""
    full = run("A", answers={}, eval_s=38.6)
    trial = run("trial-0002", lr=1.79e-3, eval_s=2.5)
    effects = knob_effects([full, trial], ["eval_loss", "rouge_l@16", "total_s"])
    by = {e.metric: e for e in effects}
    assert by["total_s"].verdict.label == "untested" and "not compared" in by["total_s"].verdict.note
    text = " ".join(f.text for f in effect_findings(effects))
    assert "lowered total time" not in text
    assert "total time (s): not compared: A (losses and answers at caps 8, 16) and trial-0002 (losses only)" in text
    # ROUGE-L: the trial never generated; said as not measured, never as "one seed per run" of two-seed runs.
    assert "not measured by both runs" in text and "one seed per run" not in text
    # The main table shows no total-time verdict for the pair, and says why under it.
    c = compare([full, trial])
    assert c.row("total_s").verdicts[0].label == "untested" and c.row("eval_s").verdicts[0].label == "untested"
    assert c.row("train_s").verdicts[0].label != "untested"  # training compares with training
    assert "not compared: the runs were evaluated differently" in to_markdown(c)


def test_the_tldr_claims_savings_in_train_time_when_evaluations_differ():
    full = run("A", answers={}, eval_s=38.6, train_s=30.0)
    same_training = run("trial-0002", lr=1.79e-3, eval_s=2.5, train_s=30.0)
    t = tldr([full, same_training], "eval_loss")
    assert t.cheapest.name == t.best.name  # neither trains faster: no saving, whatever the evaluation took
    assert "less time" not in " ".join(t.sentences)
    faster = run("trial-0002", lr=1.79e-3, eval_s=2.5, train_s=15.0)
    t = tldr([full, faster], "eval_loss")
    said = next(s for s in t.sentences if s.startswith("Cheapest"))
    assert "less train time" in said and "train time only" in said and "evaluated differently" in said


def test_a_trained_runs_total_time_is_not_compared_with_the_bases_eval_only_time():
    base, a = run("base", kind="base", answers={}), run("A", answers={})
    c = compare([base, a])
    assert c.row("total_s").verdicts[0].label == "untested"
    assert "base trains nothing" in c.row("total_s").verdicts[0].note
    assert c.row("eval_s").verdicts[0].label != "untested"  # the same evaluation, with and without the adapter


def test_the_first_finding_says_whether_any_run_answered_better_than_base():
    from loralab.analysis.findings import answer_findings

    base = run("base", kind="base", answers={})
    better = run("A", answers={"rouge_l": 0.3, "token_f1": 0.3}, loss_shift=-0.5)
    worse = run("B", seeds=(2, 3), answers={"chrf": -0.3}, loss_shift=-0.5)
    [f] = answer_findings(compare([base, better, worse]))
    assert f.text.startswith("On the answers, better than the untrained base: A on ROUGE-L @8 +0.")
    assert "token F1 @16 +0." in f.text and "chrF" not in f.text.split("Worse")[0]
    assert "Worse than the base: B on chrF @8 -0." in f.text and "chrF @16 -0." in f.text
    assert f.verdict == "mixed"


def test_lower_loss_but_no_better_answers_is_said_plainly():
    from loralab.analysis.findings import answer_findings

    base = run("base", kind="base", answers={})
    a = run("A", answers={}, loss_shift=-0.5)  # loss fell; the answers did not move
    trial = run("trial-0001", lr=2e-3, loss_shift=-0.5)  # losses only
    c = compare([base, a, trial])
    assert c.row("eval_loss").verdicts[0].label == "lower"
    [f] = answer_findings(c)
    assert f.text.startswith("On the answers, no run beat the untrained base measurably (ROUGE-L, token F1, chrF, "
                             "exact match at caps 8, 16)")
    assert "Not scored (evaluated on losses only): trial-0001" in f.text and f.verdict == "within noise"
    t = tldr([base, a, trial], "eval_loss", comparison=c)
    assert any(s.startswith("On the answers, no run beat the untrained base") for s in t.sentences)
