"""The experiment file: merging, defaults, and every problem reported at once with path, line and fix."""

from pathlib import Path

import pytest
import yaml

from loralab.errors import SpecError
from loralab.config.loading import load_experiment, parse_experiment
from loralab.config.schema import GenerateSpec, LoraSpec

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def problems_of(tmp_path, text) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_experiment(write(tmp_path, text))
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path):
    exp = load_experiment(path)
    assert exp.resolved_runs


def test_seed_report_holds_the_seed_runs_exactly():
    exp = load_experiment(Path(__file__).parents[2] / "examples" / "seed-report.yaml")
    a, b = exp.run("A"), exp.run("B")
    assert (a.lora.r, a.lora.alpha, a.lora.dropout, a.lora.target_modules) == (4, 8, 0.05, ["query_key_value"])
    assert (a.train.learning_rate, a.train.batch_size, a.train.epochs, a.generate.max_new_tokens) == (2e-4, 2, 1, [50])
    assert (b.lora.r, b.lora.alpha, b.lora.dropout, b.lora.target_modules) == (8, 16, 0.10, ["query_key_value"])
    assert (b.train.learning_rate, b.train.batch_size, b.train.epochs, b.generate.max_new_tokens) == (5e-4, 2, 1, [100])
    assert exp.eval_caps == [50, 100]


def test_runs_override_defaults_deeply(tmp_path):
    exp = load_experiment(write(tmp_path, """
defaults:
  lora: {r: 4, dropout: 0.1}
  train: {learning_rate: 1e-4, seed: 3}
runs:
  A: {}
  B: {lora: {r: 16}, generate: {max_new_tokens: [20, 10, 20]}}
"""))
    a, b = exp.run("A"), exp.run("B")
    assert a.lora.r == 4 and a.lora.alpha == 8  # alpha defaults to 2r
    assert b.lora.r == 16 and b.lora.alpha == 32 and b.lora.dropout == 0.1
    assert a.train.learning_rate == 1e-4 and b.train.seed == 3  # "1e-4" is a string to YAML 1.1, still a number here
    assert b.generate.max_new_tokens == [10, 20]
    assert exp.eval_caps == [10, 20, 64]


def test_no_runs_key_gives_one_default_run(tmp_path):
    exp = load_experiment(write(tmp_path, "defaults: {lora: {r: 2}}\n"))
    assert [r.name for r in exp.resolved_runs] == ["default"] and exp.resolved_runs[0].lora.r == 2


def test_all_problems_reported_at_once_with_path_line_value_and_fix(tmp_path):
    found = problems_of(tmp_path, """name: bad
data:
  colour: red
defaults:
  lora: {r: 0, dropout: 1.5}
  train: {learning_rate: fast}
runs:
  A: {}
  B:
    lora: {alpah: 3}
""")
    assert len(found) == 5, found
    text = "\n".join(found)
    assert "data.colour (line 3): unknown key (got 'red')" in text and "allowed here: builtin, path" in text
    assert "defaults.lora.r (line 5)" in text and "(got 0)" in text and "use a value above 0" in text
    assert "defaults.lora.dropout (line 5)" in text and "(got 1.5)" in text
    assert "defaults.train.learning_rate (line 6)" in text and "(got 'fast')" in text and "use a number" in text
    assert "runs.B.lora.alpah (line 10): unknown key" in text and "r, alpha, dropout" in text


def test_problem_in_defaults_is_reported_once_not_per_run(tmp_path):
    found = problems_of(tmp_path, "defaults: {lora: {r: -1}}\nruns: {A: {}, B: {}, C: {}}\n")
    assert len(found) == 1 and found[0].startswith("defaults.lora.r")


@pytest.mark.parametrize("text, where", [
    ("runs: {A: {lora: {r: 0}}}", "runs.A.lora.r"),
    ("runs: {A: {lora: {alpha: 0}}}", "runs.A.lora.alpha"),
    ("runs: {A: {lora: {dropout: 1.0}}}", "runs.A.lora.dropout"),
    ("runs: {A: {lora: {bias: some}}}", "runs.A.lora.bias"),
    ("runs: {A: {train: {batch_size: 0}}}", "runs.A.train.batch_size"),
    ("runs: {A: {train: {learning_rate: 2}}}", "runs.A.train.learning_rate"),
    ("runs: {A: {train: {scheduler: zigzag}}}", "runs.A.train.scheduler"),
    ("runs: {A: {train: {warmup_steps: 5, warmup_ratio: 0.1}}}", "runs.A.train"),
    ("runs: {A: {generate: {max_new_tokens: 0}}}", "runs.A.generate.max_new_tokens"),
    ("runs: {A: {generate: {max_new_tokens: many}}}", "runs.A.generate.max_new_tokens"),
    ("runs: {'../x': {}}", "runs.../x"),
    ("runs: {base: {}}", "runs.base"),
    ("runs: {}", "runs"),
    ("device: tpu", "device"),
    ("data: {builtin: stdlib-docstrings, path: x.jsonl}", "data"),
    ("model: {name: x, trust_remote: true}", "model.trust_remote"),
])
def test_bad_values_name_their_field(tmp_path, text, where):
    found = problems_of(tmp_path, text)
    assert any(p.startswith(where) for p in found), found


def test_yaml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(SpecError) as info:
        load_experiment(write(tmp_path, "runs:\n  A: {lora: {r: 4}\n  B: {}\n"))
    assert "exp.yaml:" in str(info.value) and "not valid YAML" in str(info.value)


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="no such experiment file"):
        load_experiment(tmp_path / "nope.yaml")


def test_topic_models_round_trip():
    lora = LoraSpec(r=4, target_modules="all-linear")
    assert lora.target_modules == ["all-linear"] and lora.alpha == 8
    assert LoraSpec.model_validate(lora.model_dump()) == lora
    assert GenerateSpec(max_new_tokens=30).max_new_tokens == [30]


def test_parse_rejects_non_mapping():
    with pytest.raises(SpecError, match="mapping"):
        parse_experiment(yaml.safe_load("- a\n- b\n"))


def test_bootstrap_resamples_still_loads_but_is_said_to_be_ignored():
    from loralab.config.loading import surprises

    base = "name: x\nmodel: m\ndata: {builtin: stdlib-docstrings}\nruns: {A: {}}\n"
    parse = lambda text: parse_experiment(yaml.safe_load(text), "exp.yaml", text)  # noqa: E731
    old = parse(base + "evaluation: {bootstrap_resamples: 2000}\n")
    assert any("bootstrap_resamples is ignored" in s for s in surprises(old))
    assert not any("bootstrap" in s for s in surprises(parse(base)))


@pytest.mark.parametrize("lines, why", [
    ("workspace: postgresql://u@db-host/loralab\n", "a database workspace needs `artifacts:`"),
    ("workspace: mysql://u@db-host/loralab\nartifacts: /shared/a\n", "a mysql URL: a shared workspace is a PostgreSQL database"),
])
def test_a_database_workspace_is_checked_with_the_file_not_when_run_opens_it(lines, why):
    base = "name: x\nmodel: m\ndata: {builtin: stdlib-docstrings}\nruns: {A: {}}\n"
    with pytest.raises(SpecError) as info:
        parse_experiment(yaml.safe_load(base + lines), "exp.yaml", base + lines)
    (problem,) = info.value.problems
    assert problem.where == "workspace (line 5)" and why in problem.message and "u@db-host" in str(problem)
    ok = base + "workspace: postgresql://u:secret@db-host/loralab\nartifacts: /shared/a\n"
    assert parse_experiment(yaml.safe_load(ok), "exp.yaml", ok).artifacts == "/shared/a"  # not connected to: read as given


@pytest.mark.parametrize("knob, key, says", [
    ("rank_pattern", "[q", "unterminated character set at position 0"),
    ("alpha_pattern", "v_proj)", "unbalanced parenthesis at position 6"),
    ("rank_pattern", "*_proj", "nothing to repeat at position 0"),
])
def test_a_pattern_key_that_is_no_regex_is_refused_when_the_file_loads(tmp_path, knob, key, says):
    """PEFT matches rank_pattern/alpha_pattern keys as regular expressions: a broken one failed only in run,
    after the model loaded, with a bare "unterminated character set"."""
    found = problems_of(tmp_path, f"name: p\nruns:\n  A: {{lora: {{{knob}: {{'{key}': 2, v_proj: 4}}}}}}\n")
    assert len(found) == 1 and f"runs.A.lora.{knob}" in found[0] and repr(key) in found[0] and says in found[0]
    assert "Fix: " in found[0] and "backslash" in found[0]


def test_pattern_keys_that_are_regexes_load():
    spec = LoraSpec(rank_pattern={r"layers\.0\.self_attn\.v_proj": 2, "q_proj": 4}, alpha_pattern={"(q|v)_proj": 8})
    assert spec.rank_pattern[r"layers\.0\.self_attn\.v_proj"] == 2


def test_an_artifacts_folder_that_cannot_be_written_is_caught_by_validate(tmp_path, monkeypatch):
    """`run` found it only when it stored its first adapter, after training; validate checks where the
    folder is or would be made. A path none of which exists here is left to the cluster's hosts."""
    import os

    base = "name: x\nmodel: m\ndata: {builtin: stdlib-docstrings}\nruns: {A: {}}\nworkspace: postgresql://u@db-host/loralab\n"
    parse = lambda text: parse_experiment(yaml.safe_load(text), "exp.yaml", text)  # noqa: E731
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpecError) as info:
        parse(base + f"artifacts: {tmp_path / 'file' / 'adapters'}\n")
    (problem,) = info.value.problems
    assert problem.where == "artifacts (line 6)" and f"{tmp_path / 'file'} is a file, not a folder" in problem.message
    real = os.statvfs

    class ReadOnly:  # what statvfs says of a read-only mount (root can write nowhere there either)
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly() if str(p) == str(tmp_path) else real(p))
    with pytest.raises(SpecError) as info:
        parse(base + f"artifacts: {tmp_path / 'new'}\n")
    assert f"{tmp_path} is on a read-only file system" in info.value.problems[0].message
    (tmp_path / "ok").mkdir()
    assert parse(base + f"artifacts: {tmp_path / 'ok' / 'adapters'}\n").artifacts.endswith("adapters")
    assert parse(base + "artifacts: /no-such-mount/a\n").artifacts == "/no-such-mount/a"
    assert not [p for p in (tmp_path / "ok").iterdir()]  # the write check leaves nothing behind
    monkeypatch.undo()
    try:  # a real file system that refuses folders even to root (sysfs), where one is at hand
        os.mkdir("/sys/loralab-write-check")
    except OSError:
        with pytest.raises(SpecError) as info:
            parse(base + "artifacts: /sys/loralab-artifacts\n")
        assert "/sys refuses new folders" in info.value.problems[0].message
    else:
        os.rmdir("/sys/loralab-write-check")
