"""The report built from stored records (fabricated, no training): its first finding says whether any run
answered better than base; its TL;DR reads the table, names the winner's curse; loss-only sweep trials and
fully evaluated runs are compared on train time, never on total time."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))

from test_like_with_like import run  # noqa: E402

from loralab.report.build import Sources, build, render_markdown  # noqa: E402


def test_a_sweeps_report_reads_like_with_like(tmp_path):
    base = run("base", kind="base", answers={})
    full = run("A", answers={"chrf": -0.3}, loss_shift=-0.3, eval_s=38.6)
    trial = run("trial-0001", lr=1.79e-3, eval_s=2.5, loss_shift=-0.35)
    other = run("trial-0002", lr=3e-3, eval_s=2.5, loss_shift=-0.1)
    r = build(Sources("t", "", tmp_path, chosen=[base, full, trial], trials=[trial, other]))
    # The first finding is about the answers: none better than base; A worse on chrF at both caps.
    first = r.learned[0]
    assert first.kind == "answers" and first.text.startswith("On the answers, no run beat the untrained base measurably")
    assert "Worse than the base: A on chrF @8" in first.text and "chrF @16" in first.text
    assert first.text in r.tldr.sentences  # and the TL;DR says it too, not only the best eval loss
    # A sweep's best picked among several is flattered: said.
    assert any("winner's curse" in s for s in r.tldr.sentences)
    # Training took the same time; the trial's evaluation was loss-only: no time effect, no saving.
    text = " ".join(f.text for f in r.learned) + " ".join(r.tldr.sentences)
    assert "total time by" not in text and "less time" not in text
    assert "not compared: A (losses and answers at caps 8, 16) and trial-0001 (losses only)" in text
    cost_plot = next(p for p in r.plots if p.name == "quality-vs-cost")
    assert "train time per run" in cost_plot.svg
    md = render_markdown(r)
    ppl = next(line for line in md.splitlines() if line.startswith("| eval perplexity |"))
    assert " ± " not in ppl and "[" in ppl  # exp of the loss interval: asymmetric, shown as [low, high]


def test_a_confirmation_run_is_shown_beside_the_searched_value(tmp_path):
    base = run("base", kind="base", answers={})
    trials = [run(f"trial-000{i}", lr=lr, loss_shift=s) for i, (lr, s) in enumerate([(1e-3, -0.1), (2e-3, -0.4), (3e-3, -0.2)])]
    confirm = run("trial-0001-confirm", seeds=(100, 101), lr=2e-3, loss_shift=-0.25)
    for r in confirm:
        r.config["confirms"] = "trial-0001"  # what the store's confirmation runs carry
    r = build(Sources("sweep", "", tmp_path, chosen=[base, trials[1]], trials=trials, confirmations=[confirm]))
    assert r.tldr.best.name == "trial-0001"
    said = next(s for s in r.tldr.sentences if s.startswith("Confirmed on fresh seeds: trial-0001 1.7"))
    assert "(2 seeds) against 1.6" in said and "best of 3" in said
    assert "trial-0001-confirm" in [row["name"] for row in r.runs.rows]  # listed with the runs, never a candidate
