"""`loralab report`: the seed's A and B on a tiny model with their one-knob ablation, written as
Markdown and as one HTML file; hostile model output stays text; the page renders in headless Chromium
with no console error and every plot drawn."""

import copy
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy.orm import Session
from typer.testing import CliRunner

import loralab
from loralab import api
from loralab.cli import app
from loralab.workspace.store import RunRow, Store

import chromium
from test_runner import SEED_RUNS, diverging_experiment, experiment

cli = CliRunner()
# The TL;DR first (issue 25: a reader who stops after one screen gets the answer), then the seed's order.
SECTIONS = ["TL;DR", "1. Goal and setup", "2. Runs", "3. Main differences", "4. Confounds", "5. Effects",
            "6. Curves and pictures", "7. Samples side by side", "8. What we learned"]
# A model answer that tries everything: a script, raw HTML, a table break, an image, code and emphasis.
EVIL = ('<script>alert("owned")</script> | cell | break\n| --- | --- |\n<img src=x onerror=alert(1)> '
        '![pixel](http://evil.example/p.png) [link](javascript:alert(1)) `code` **bold** _em_ &amp; done')


def inject(ws: Path, run_id: str, cap_small: str, cap_large: str) -> None:
    """Put EVIL into a stored run's first sample: prompt, reference and the answers at both caps."""
    store = Store(ws)
    try:
        with Session(store.engine) as s, s.begin():
            row = s.get(RunRow, run_id)
            samples = copy.deepcopy(row.samples)
            first = samples[0]
            first["prompt"], first["reference"] = "Prompt " + EVIL, "Reference " + EVIL
            first["outputs"][cap_small]["text"] = EVIL[:31]  # the smaller cap's answer is a prefix of the larger's
            first["outputs"][cap_large]["text"] = EVIL
            row.samples = samples
    finally:
        store.close()


@pytest.fixture(scope="module")
def reported(tiny_neox, tmp_path_factory):
    """Seed A and B with 2 seeds and a price, hostile text in A's samples, the ablation run, the report written."""
    tmp = tmp_path_factory.mktemp("report")
    exp_path = experiment(tmp, tiny_neox, "repeats: 2\ncost: {per_hour: 3.6, currency: EUR}\n" + SEED_RUNS)
    exp_path.write_text("# Run it:  loralab run seed.yaml\n#\n# Does B beat A, and why?\n" + exp_path.read_text())
    ws = tmp / "ws"
    first = loralab.run(loralab.load(exp_path), workspace=ws)
    a0 = next(r for r in first.records if r.name == "A" and r.seed == 0)
    inject(ws, a0.id, "5", "10")
    api.ablate(exp_path, "A", "B", workspace=ws, train=True)
    written = api.report(exp_path, out=tmp / "out", workspace=ws)
    return written, exp_path, ws, tmp


def test_sections_in_the_seed_order(reported):
    written = reported[0]
    md, html = written.markdown.read_text(), written.html.read_text()
    heads = re.findall(r"^## (.+)$", md, flags=re.M)
    assert heads == SECTIONS
    positions = [html.index(f"<h2>{s}</h2>") for s in SECTIONS]
    assert positions == sorted(positions)
    assert md.startswith("# seed: what we learned") and "Does B beat A, and why?" in md  # the file's comment is the goal


def test_setup_runs_and_statuses(reported):
    r = reported[0].report
    setup = dict(r.setup)
    assert "gpt_neox" in setup["Model"] and "8 training / 4 eval examples" in setup["Data"]
    assert setup["Price"] == "3.6 EUR per hour" and "torch" in setup["Versions"] and "CPUs" in setup["Machine"]
    exp_path = reported[1]
    assert setup["Reproduce"] == (f"`loralab run {exp_path}`; `loralab ablate {exp_path} A B --design ofat --run`; "
                                  f"`loralab report {exp_path}`")
    rows = {row["name"]: row for row in r.runs.rows}
    assert list(rows) == ["base", "A", "B", "A+r", "A+dropout", "A+lr"]  # alpha follows r: alpha/r is A's and B's
    assert rows["A"]["compared"] and not rows["A+lr"]["compared"]
    assert rows["A+lr"]["seeds"] == "0, 1" and rows["A+lr"]["status"] == "finished"
    assert r.runs.columns == ["lora.r", "lora.alpha", "lora.dropout", "train.learning_rate", "generate.max_new_tokens"]
    assert rows["A+lr"]["values"][3] == "0.0005" and rows["A+lr"]["values"][0] == "4"


def test_confound_is_named_and_each_knob_credited(reported):
    r = reported[0].report
    text = " ".join(f.text for f in r.confounds)
    assert "A and B differ in 4 knobs (lora.r (alpha moved with r, alpha/r kept at 2), lora.dropout, " \
           "train.learning_rate, generate.max_new_tokens), so no single knob can be credited" in text
    assert not any(f.kind == "plan" for f in r.confounds)  # every knob was measured by the ablation
    by_knob = {(e.knob, e.metric): e for e in r.effects}
    for knob, run in [("lora.r", "A+r"), ("lora.dropout", "A+dropout"), ("train.learning_rate", "A+lr")]:
        e = by_knob[(knob, "eval_loss")]
        assert e.source == f"{run} vs A" and e.seeds == 2 and e.verdict is not None
    cap = by_knob[("generate.max_new_tokens", "mean_tokens@10")]
    assert (cap.low, cap.high, cap.design) == (5, 10, "cap") and "A's answers at cap 5 vs 10" in cap.source
    # The numbers in the findings are the effects' own.
    lr = by_knob[("train.learning_rate", "eval_loss")]
    from loralab.analysis.findings import interval

    assert any(interval(lr.verdict, "f4") in f.text for f in r.learned)
    assert [f.kind for f in r.learned].count("confound") == 0  # stated once, in the Confounds section
    assert by_knob[("lora.r", "eval_loss")].note == "alpha moved with r, alpha/r kept at 2"
    md = reported[0].markdown.read_text()
    header = next(line for line in md.splitlines()
                  if line.startswith("| metric | lora.r 4 → 8 (alpha moved with r, alpha/r kept at 2) |"))
    assert "| train.learning_rate 0.0002 → 0.0005 | generate.max_new_tokens 5 → 10 |" in header
    row = [line for line in md.splitlines() if line.startswith("| eval loss |")][-1]  # the first: main differences
    assert interval(lr.verdict, "f4") in row and "A+lr vs A (2 seeds)" in md


def test_hostile_model_output_stays_text(reported):
    written = reported[0]
    md, html = written.markdown.read_text(), written.html.read_text()
    # HTML: no markup from the model survives; it is all there as text.
    assert "<script" not in html.lower() and "<img" not in html.lower()
    assert not re.search(r"<[^>]*\son\w+=", html)  # no tag carries an event handler
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;" in html
    # Markdown: no raw HTML, no image or link, and no table broken by the pipes and newlines.
    assert "<script" not in md and "<img" not in md and not re.search(r"(?<!\\)\]\(", md.split("## 7.")[1])
    assert "&lt;script&gt;" in md
    for table in re.findall(r"((?:^\|.*\n)+)", md, flags=re.M):
        lines = table.splitlines()
        width = len(re.findall(r"(?<!\\)\|", lines[0]))
        assert all(len(re.findall(r"(?<!\\)\|", line)) == width for line in lines), table


def test_html_is_one_self_contained_file(reported):
    written = reported[0]
    html = written.html.read_text()
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?(?:https?:|//)""", html)
    assert "<link" not in html and "@import" not in html and not re.search(r"url\((?!#)", html)
    assert html.count("<svg") == len(written.report.plots) >= 4
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # several inline SVGs, no id twice
    names = {p.name for p in written.report.plots}
    assert {"loss-curves", "quality-vs-cost", "tokens-per-cap", "effect-eval-loss"} <= names
    for p in written.plots:  # the Markdown's plots are files beside it
        assert p.is_file() and f"(plots/{p.name})" in written.markdown.read_text()


def test_report_renders_in_headless_chromium(reported, tmp_path):
    binary = chromium.find()
    if binary is None:
        if os.environ.get("LORALAB_REQUIRE_CHROMIUM") == "1":
            pytest.fail("Chromium is required here (LORALAB_REQUIRE_CHROMIUM=1): apt-get install chromium")
        pytest.skip("Chromium not installed (CI installs it: .ci/run)")
    written = reported[0]
    with chromium.Browser(binary) as browser:
        page = browser.open(written.html.resolve().as_uri())
        assert page.problems() == []  # no console error or warning, no CSP violation, no exception
        assert page.requests() == [written.html.resolve().as_uri()]  # nothing else was fetched
        assert page.evaluate("document.scripts.length") == 0
        figures = page.evaluate("""[...document.querySelectorAll('svg.plot')].map(s => {
            const r = s.getBoundingClientRect();
            return {id: s.closest('figure').id, w: r.width, h: r.height, paths: s.querySelectorAll('path').length,
                    texts: s.querySelectorAll('text').length};
        })""")
        assert len(figures) == len(written.report.plots)
        for f in figures:  # each plot laid out at a visible size and drawn
            assert f["w"] > 300 and f["h"] > 80 and f["paths"] > 3 and f["texts"] > 3, f
        assert 'alert("owned")' in page.evaluate("document.body.innerText")  # the model's text shown as text
        shot = page.screenshot(tmp_path / "report.png")
    assert shot.stat().st_size > 50_000
    if os.environ.get("LORALAB_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["LORALAB_REPORT_SCREENSHOT"])


def test_report_of_chosen_runs_adds_the_base(reported):
    _, _, ws, tmp = reported
    w = api.report(["A", "A+lr"], out=tmp / "chosen", workspace=ws)
    r = w.report
    assert r.comparison.runs == ["base", "A", "A+lr"] and r.confounds == []
    assert [row["name"] for row in r.runs.rows] == ["base", "A", "A+lr"]
    assert any(e.knob == "train.learning_rate" and e.source == "A+lr vs A" for e in r.effects)
    assert r.goal.startswith("Compare A, A+lr against the untrained base")


def test_cli_report_and_its_errors(reported):
    _, exp_path, ws, tmp = reported
    out = cli.invoke(app, ["report", str(exp_path), "-w", str(ws), "--out", str(tmp / "cli"), "--metric", "rouge_l@10"])
    assert out.exit_code == 0, out.output
    assert "Best ROUGE-L @10" in out.output and (tmp / "cli" / "report.html").is_file()
    for args, needle in [(["report", "Z", "-w", str(ws)], "'Z'"),
                         (["report", str(exp_path), "-w", str(ws), "--metric", "happiness"], "--metric"),
                         (["report", str(exp_path), "A", "-w", str(ws)], "one experiment file"),
                         (["report", str(exp_path), "-w", str(tmp / "nowhere")], "no loralab workspace"),
                         (["report", str(tmp / "missing.yaml"), "-w", str(ws)], "no such experiment file")]:
        res = cli.invoke(app, args + ["--out", str(tmp / "x")])
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output and "Traceback" not in res.output


def test_report_with_a_diverged_run(tmp_path):
    exp_path = diverging_experiment(tmp_path)
    loralab.run(loralab.load(exp_path), workspace=tmp_path / "ws")
    w = api.report(exp_path, out=tmp_path / "out", workspace=tmp_path / "ws")
    rows = {row["name"]: row for row in w.report.runs.rows}
    assert rows["A"]["status"].startswith("diverged at step ")
    assert w.report.tldr.best.name == "B"  # a diverged run is never recommended
    assert "diverged" in w.markdown.read_text()


def test_report_of_a_sweep_shows_trials_their_statuses_and_importances(tiny_neox, tmp_path):
    from test_sweep import BASE, sweep_file

    from loralab.sweep.study import run_sweep

    f = sweep_file(tmp_path, tiny_neox, """
strategy: grid
seed: 1
space:
  lora.r: [2, 4]
  train.learning_rate: [2.0e-2, 1.0e-3, 1.0e-7]
pruner: {name: median, every: 2, startup_trials: 2}
""", extra=BASE.replace("max_steps: 6", "max_steps: 12"))
    result = run_sweep(loralab.load(f), workspace=tmp_path / "ws")
    w = api.report(f, out=tmp_path / "out", workspace=tmp_path / "ws")
    r = w.report
    rows = {row["name"]: row for row in r.runs.rows}
    assert set(rows) >= {f"trial-{t.number:04d}" for t in result.trials}
    statuses = {row["status"] for row in rows.values()}
    assert "finished" in statuses and any(s.startswith("pruned at step ") for s in statuses)
    assert r.runs.columns == ["lora.r", "lora.alpha", "train.learning_rate"]  # alpha = 2r follows r
    best = f"trial-{result.best[0].number:04d}"
    assert r.comparison.runs[0] == best and rows[best]["compared"]  # the best trials lead the main table
    assert len(r.comparison.runs) == 3 and r.samples == []  # loss-only trials generated no answers
    assert r.goal.startswith("Search lora.r, train.learning_rate (grid) for the best eval_loss")
    # Six trials, some pruned, for two knobs: too few for importances, and the report says so.
    assert r.importances == {} and not any(f.kind == "importance" for f in r.learned)
    # r searched over [2, 4] only: the best trial's r is at an end whatever it is, and the report says so.
    [edge] = [f for f in r.learned if f.kind == "edge"]
    assert "sits at an edge of the space" in edge.text and "lora.r = " in edge.text
    note = next(n for n in r.notes if n.startswith("Parameter importances not shown"))
    assert "16 are needed for 2 searched knob(s)" in note and "pruned trial(s) do not count" in note
    assert w.html.read_text().count("<svg") >= 2


def test_a_confound_without_its_ablation_gives_the_plan(reported):
    from loralab.report.build import _plan_text, from_file

    _, exp_path, ws, tmp = reported
    r = api.report(["A", "B"], out=tmp / "ab", workspace=ws).report  # chosen runs: the ablation is not among them
    [plan] = [f for f in r.confounds if f.kind == "plan"]
    assert plan.text.startswith("Not yet measured on its own: lora.r, lora.dropout, train.learning_rate.")
    assert "`loralab ablate FILE A B --design ofat --run`" in plan.text
    text = _plan_text(from_file(loralab.load(exp_path), ws), "A", "B")  # from the file: the cost of each design
    assert text == (f"`loralab ablate {exp_path} A B --design ofat --run` trains 3 new run(s) × 2 seed(s), one knob at "
                    "a time from A; `--design factorial` trains 6 × 2, every knob at both values (full factorial), "
                    "and averages each effect over the others")


def test_runs_without_an_outcome_are_left_out_with_a_note():
    from loralab.report.build import settled

    from test_findings import group

    runs = group("B")
    runs[1:] = [replace(runs[1], status="running"), replace(runs[2], status="failed")]
    notes = []
    assert [r.seed for r in settled(runs, notes)] == [0]
    assert notes == ["fab/B seed 1 is running: left out until it finishes.",
                     "fab/B seed 2 is failed: left out (see `loralab show`)."]


def test_importances_come_with_their_spread_over_resampled_trials(tmp_path):
    import optuna

    from loralab.analysis.findings import importance_findings
    from loralab.report.build import IMPORTANCE_RESAMPLES, Sources, _importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    # 24 trials: the objective follows x almost entirely; y adds a little.
    study.optimize(lambda t: 10 * t.suggest_float("x", 0, 1) + 0.1 * t.suggest_float("y", 0, 1), n_trials=24)
    src = Sources(title="s", goal="", workspace=tmp_path, chosen=[], study=study)
    imp = _importances(src)["objective"]
    x, y = sorted(imp, key=lambda i: i.knob)
    assert x.value > y.value and x.lo <= x.value <= x.hi and x.lo > y.hi
    [f] = importance_findings({"objective": imp}, 24, IMPORTANCE_RESAMPLES)
    assert f.knob == "x" and "x mattered most" in f.text
    # Fewer than 16 trials: none, and a note with the count.
    small = optuna.create_study()
    small.add_trials(study.trials[:10])
    src = Sources(title="s", goal="", workspace=tmp_path, chosen=[], study=small)
    assert _importances(src) == {} and "10 completed trial(s), and 16 are needed" in src.notes[0]


def test_compute_counts_a_reused_adapters_training_once(tmp_path):
    from loralab.report.build import Sources, _setup

    from test_findings import group

    [trained] = group("A", seeds=(0,), per_run={"total_s": 100.0, "train_s": 60.0})
    [again] = group("A2", seeds=(0,), per_run={"total_s": 100.0, "train_s": 60.0})
    again = replace(again, timings={"train_reused_from": trained.id})  # evaluated the stored adapter only: 40 s of its own
    setup = dict(_setup(Sources("t", "", tmp_path, []), [trained, again], None))
    assert setup["Compute"].startswith("2 stored runs, 2.3 min of training and evaluation")  # (100 + 40) s


def test_importances_need_trials_for_the_knobs_that_vary_only(tmp_path):
    """Two of four knobs never move (one choice each): 17 trials are enough for the two that do (16 at
    least, 8 per knob), not the 32 four knobs would need."""
    import optuna

    from loralab.report.build import Sources, _importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 10 * t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1)
                   + t.suggest_categorical("r", [8]) + t.suggest_categorical("dropout", [0.0]), n_trials=17)
    src = Sources(title="s", goal="", workspace=tmp_path, chosen=[], study=study)
    imp = _importances(src)
    assert not src.notes and {i.knob for i in imp["objective"]} == {"x", "y"}
