"""Ablations: the designs (one knob at a time, a resolution IV fraction), the plan as a runnable
experiment file that reuses A and B, and each knob credited with its own effect once it ran."""

import itertools
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import loralab
from loralab import api
from loralab.analysis.ablate import (ablation_of, differing, experiment_name, factorial_rows, find_design, knob_effects,
                            ofat_rows, plan, resolution, run_knobs)
from loralab.cli import app
from loralab.errors import SpecError

from test_findings import group
from test_runner import SEED_RUNS, experiment

cli = CliRunner()


@pytest.mark.parametrize("n, runs, res", [(1, 2, None), (2, 4, None), (3, 8, None), (4, 8, 4), (5, 16, 4),
                                           (8, 16, 4), (9, 32, 4)])
def test_factorial_rows_are_balanced_orthogonal_and_resolution_iv(n, runs, res):
    rows = factorial_rows(n)
    assert len(rows) == runs and len(set(rows)) == runs
    assert rows[0] == (0,) * n and rows[-1] == (1,) * n  # A and B are design points: both reused
    signs = [[2 * x - 1 for x in r] for r in rows]
    for i in range(n):
        assert sum(s[i] for s in signs) == 0  # each knob at B's value in half the runs
        for j in range(i + 1, n):
            assert sum(s[i] * s[j] for s in signs) == 0  # no two knobs move together
    assert resolution(rows) == res  # None: a full factorial, nothing aliased


def test_resolution_of_a_known_resolution_iii_fraction():
    # 2^(3-1) with C = AB: the word ABC has three letters, so main effects alias two-knob interactions.
    rows = [(a, b, int(a == b)) for a, b in itertools.product((0, 1), repeat=2)]
    assert resolution(rows) == 3


def test_ofat_rows():
    assert ofat_rows(3) == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)]
    assert ofat_rows(1) == [(0,), (1,)]  # one knob: A and B already differ in it alone


def test_ofat_plan_of_the_seed_example_is_a_runnable_file(tmp_path):
    exp = loralab.load(api.example_path("seed-report.yaml"))
    # A (r 4, alpha 8) and B (r 8, alpha 16) have the same update scale alpha/r = 2: by default alpha
    # follows r, so r is one knob and no alpha run is needed.
    default = plan(exp, "A", "B", "ofat", workspace=tmp_path / "ws")
    assert default.knobs == ["lora.r", "lora.dropout", "train.learning_rate"]
    assert [r.name for r in default.runs] == ["A", "A+r", "A+dropout", "A+lr", "B"]
    a_r = default.runs[1].spec.lora
    assert (a_r.r, a_r.alpha) == (8, 16.0)  # alpha/r kept at A's 2
    assert "alpha moves with it so alpha/r stays" in " ".join(default.summary())
    # Asked to hold alpha: r and alpha are two knobs, as set.
    p = plan(exp, "A", "B", "ofat", workspace=tmp_path / "ws", hold="alpha")
    assert p.knobs == ["lora.r", "lora.alpha", "lora.dropout", "train.learning_rate"]
    assert p.eval_only == ["generate.max_new_tokens"]  # not trained: every cap comes from one generation
    assert [r.name for r in p.runs] == ["A", "A+r", "A+alpha", "A+dropout", "A+lr", "B"]
    assert (p.runs[1].spec.lora.r, p.runs[1].spec.lora.alpha) == (8, 8.0)
    assert p.experiment.name == "seed-report.A-vs-B.ofat-hold-alpha"
    assert ablation_of("seed-report", p.experiment.name) == ("A", "B", "ofat")
    from loralab.analysis.ablate import write_plan

    path = write_plan(p, tmp_path / "plan.yaml")
    text = path.read_text()
    assert text.startswith(f"# Run it:  loralab run {path}\n")
    again = loralab.load(path)  # a valid experiment file
    assert again.name == "seed-report.A-vs-B.ofat-hold-alpha" == experiment_name("seed-report", "A", "B", "ofat", "alpha")
    assert again.run("A") == exp.run("A") and again.run("B") == exp.run("B")  # same settings: same run ids
    assert again.eval_caps == exp.eval_caps and again.workspace == str(tmp_path / "ws")
    ka = run_knobs(exp.run("A"))
    for name, knob in [("A+r", "lora.r"), ("A+alpha", "lora.alpha"), ("A+dropout", "lora.dropout"),
                       ("A+lr", "train.learning_rate")]:
        moved = run_knobs(again.run(name))
        assert differing(ka, moved) == [knob]  # exactly one knob moved, to B's value
        assert moved[knob] == run_knobs(exp.run("B"))[knob]
    assert "  # train.learning_rate: 0.0002 -> 0.0005" in text


def test_factorial_plan_trains_six_new_runs(tmp_path):
    exp = api.with_repeats(loralab.load(api.example_path("seed-report.yaml")), 3)
    p = plan(exp, "A", "B", "factorial", workspace=tmp_path, hold="alpha")
    assert len(p.runs) == 8 and len(p.new_runs) == 6 and p.resolution == 4 and p.seeds == [0, 1, 2]
    assert "A+r+alpha" in [r.name for r in p.runs]
    assert "resolution IV" in p.summary()[0] and "6 new run(s) x 3 seed(s) = 18 training run(s)" in p.summary()[1]
    assert yaml.safe_load(p.text)["repeats"] == 3


@pytest.mark.parametrize("a, b, design, needle", [
    ("A", "A", "ofat", "two different runs"),
    ("A", "B", "halving", "unknown ablation design"),
    ("A", "Z", "ofat", "no run 'Z'"),
    ("A", "A2", "ofat", "train the same adapter"),  # A2 differs from A in max_new_tokens only
])
def test_plan_refuses_what_cannot_be_ablated(tmp_path, a, b, design, needle):
    runs = SEED_RUNS + "  A2:\n    lora: {r: 4, alpha: 8, dropout: 0.05, target_modules: [query_key_value]}\n" \
                       "    train: {learning_rate: 2.0e-4, batch_size: 2, epochs: 1}\n    generate: {max_new_tokens: 10}\n"
    exp = loralab.load(experiment(tmp_path, Path("some-model"), runs))
    with pytest.raises(SpecError, match=needle) as err:
        plan(exp, a, b, design, workspace=tmp_path)
    assert err.value.problems and err.value.exit_code == 2


def test_plan_paths_are_absolute_so_it_runs_from_anywhere(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text(json.dumps({"instruction": "hi", "output": "there"}) + "\n")
    exp = loralab.load(experiment(tmp_path / "d", Path("some-model"), SEED_RUNS, data="{path: train.jsonl}"))
    p = plan(exp, "A", "B", workspace=tmp_path / "ws")
    doc = yaml.safe_load(p.text)
    assert doc["data"]["path"] == str(tmp_path / "d" / "train.jsonl") and doc["model"] == "some-model"


def test_ablation_names_are_recognised():
    assert ablation_of("seed-report", "seed-report.A-vs-B.ofat") == ("A", "B", "ofat")
    assert ablation_of("seed-report", "seed-report.A-vs-B+lr.factorial") == ("A", "B+lr", "factorial")
    assert ablation_of("seed-report", "other.A-vs-B.ofat") is None
    assert ablation_of("seed", "seed-report.A-vs-B.ofat") is None


def test_find_design_credits_main_effects_of_a_fraction():
    # A resolution IV 2^(4-1) over four knobs, per-example losses built from known main effects:
    # r -0.30, alpha 0, dropout +0.10, lr -0.50 (no interactions).
    knobs = {"lora.r": (4, 8), "lora.alpha": (8.0, 16.0), "lora.dropout": (0.05, 0.1), "train.learning_rate": (2e-4, 5e-4)}
    true = {"lora.r": -0.30, "lora.alpha": 0.0, "lora.dropout": 0.10, "train.learning_rate": -0.50}
    groups = []
    for i, row in enumerate(factorial_rows(4)):
        at = {k: v[x] for (k, v), x in zip(knobs.items(), row)}
        shift = sum(true[k] for k, x in zip(knobs, row) if x)
        groups.append(group(f"run{i}", loss_shift=shift, seeds=(0, 1),
                            lora={"r": at["lora.r"], "alpha": at["lora.alpha"], "dropout": at["lora.dropout"]},
                            train={"learning_rate": at["train.learning_rate"]}))
    d = find_design(groups)
    assert d is not None and d.knobs == list(knobs) and d.resolution == 4
    effects = {e.knob: e for e in knob_effects(groups, ["eval_loss"])}
    for k, v in true.items():
        e = effects[k]
        assert e.design == "factorial" and e.verdict.diff == pytest.approx(v, abs=1e-9)
        assert (e.low, e.high) == knobs[k]
    assert effects["lora.alpha"].verdict.label == "within noise" and effects["train.learning_rate"].verdict.label == "lower"
    assert "main effect over 8 runs (resolution IV fraction of 4 knobs)" == effects["lora.r"].source


def test_no_design_among_runs_that_are_not_one():
    a = group("A")
    lr = group("A+lr", train={"learning_rate": 5e-4})
    r = group("A+r", lora={"r": 8})
    both = group("A+r+lr+d", lora={"r": 8, "dropout": 0.1}, train={"learning_rate": 5e-4})
    assert find_design([a, lr, r, both]) is None  # dropout moves in one run only: not balanced


@pytest.fixture(scope="module")
def ablated(tiny_neox, tmp_path_factory):
    """The seed's A and B (2 seeds) on a tiny model, then `loralab ablate … --run`."""
    tmp = tmp_path_factory.mktemp("ablate")
    exp_path = experiment(tmp, tiny_neox, "repeats: 2\n" + SEED_RUNS)
    first = loralab.run(loralab.load(exp_path), workspace=tmp / "ws")
    out = cli.invoke(app, ["ablate", str(exp_path), "A", "B", "--run", "-w", str(tmp / "ws")])
    return exp_path, first, out, tmp


def test_ablate_run_reuses_a_and_b_and_trains_one_knob_at_a_time(ablated):
    exp_path, first, out, tmp = ablated
    assert out.exit_code == 0, out.output
    plan_path = tmp / "ws" / "ablations" / "seed.A-vs-B.ofat.yaml"
    assert f"Wrote {plan_path}" in out.output.replace("\n", "")
    assert "base: finished earlier" in out.output and "A (seed 1): finished earlier" in out.output
    assert "B (seed 0): finished earlier" in out.output
    store_runs = loralab.list_runs(tmp / "ws", experiment="seed.A-vs-B.ofat")
    assert sorted({r.name for r in store_runs}) == ["A", "A+dropout", "A+lr", "A+r", "B", "base"]
    ids = {r.name: r.id for r in first.records if r.seed in (None, 0)}
    assert {r.id for r in store_runs if r.name == "A" and r.seed == 0} == {ids["A"]}  # the very same run
    assert "Each knob on its own" in out.output and "train.learning_rate" in out.output


def test_ablate_cli_refuses_bad_input_with_exit_2(ablated):
    exp_path, _, _, tmp = ablated
    out = cli.invoke(app, ["ablate", str(exp_path), "A", "B", "--design", "halving", "-w", str(tmp / "ws")])
    assert out.exit_code == 2 and "--design" in out.output and "ofat, factorial" in out.output
    out = cli.invoke(app, ["ablate", str(tmp / "nope.yaml"), "A", "B"])
    assert out.exit_code == 2 and "no such experiment file" in out.output
