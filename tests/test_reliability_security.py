"""Untrusted content: model folders (pickles, custom code), names from experiment files, and model or
user text on the terminal. Each test first shows that its hostile input really is hostile (the
pickle runs code when unpickled, the custom code runs when imported), so "nothing happened" means
loralab kept it from happening."""

from __future__ import annotations

import pickle
import runpy
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import loralab
from loralab.cli import app
from loralab.config.schema import ModelSpec
from loralab.workspace.store import Store

from test_reliability_inputs import write_remote_code_model

EXP = """name: {name}
model: {model}
data: {{builtin: stdlib-docstrings, train_size: 4, eval_size: 2}}
evaluation: {{drift: false}}
runs:
  {run}: {{lora: {{r: 2}}, train: {{max_steps: 2}}, generate: {{max_new_tokens: 4}}}}
"""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class _Payload:
    """Unpickling this opens (creates) a file: any code could run in its place."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write(tmp: Path, model: Path | str, name: str = "sec", run: str = "A") -> Path:
    p = tmp / "exp.yaml"
    p.write_text(EXP.format(name=name, model=model, run=run))
    return p


def test_pickle_weights_next_to_safetensors_are_never_unpickled(tiny_neox, tmp_path):
    payload = pickle.dumps(_Payload(tmp_path / "control"))
    pickle.loads(payload)
    assert (tmp_path / "control").exists()  # the payload really runs code when unpickled
    model = tmp_path / "model"
    shutil.copytree(tiny_neox, model)
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp_path / "PWNED")))
    result = loralab.run(loralab.load(write(tmp_path, model)), workspace=tmp_path / "ws")
    assert [r.status for r in result.records] == ["finished", "finished"]
    assert not (tmp_path / "PWNED").exists()
    adapter = Path(result.records[1].adapter_path)  # and loralab writes no pickle either
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not [f.name for f in adapter.iterdir() if f.name.endswith(PICKLE_SUFFIXES)]


def test_a_model_with_its_own_code_is_refused_and_the_code_never_runs(tiny_neox, tmp_path):
    write_remote_code_model(tmp_path / "evil", tiny_neox, tmp_path / "PWNED")
    runpy.run_path(str(tmp_path / "evil" / "configuration_evil.py"))
    assert (tmp_path / "PWNED").exists()  # importing that code really runs it
    (tmp_path / "PWNED").unlink()
    f = write(tmp_path, "evil")
    for args in (["validate", f], ["run", f, "-w", tmp_path / "ws"]):
        out = CliRunner().invoke(app, [str(a) for a in args])
        assert out.exit_code == 2 and "model.trust_remote_code" in out.output, out.output
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "ws").exists()


@pytest.mark.parametrize("model, expected", [("m", False), ({"name": "m", "trust_remote_code": True}, True)])
def test_trust_remote_code_reaches_transformers_only_when_the_file_sets_it(model, expected, tiny_neox, tmp_path,
                                                                            monkeypatch):
    import transformers

    from loralab.engine.models import load_base_model

    seen = {}

    def record(cls, ref, **kwargs):
        seen[cls.__name__] = kwargs.get("trust_remote_code")
        raise OSError("stop here")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(record))
    shutil.copytree(tiny_neox, tmp_path / "m")
    spec = ModelSpec.model_validate({"name": model} if isinstance(model, str) else model)
    with pytest.raises(loralab.LoralabError):
        load_base_model(spec, tmp_path, log=lambda s: None)
    assert seen == {"AutoTokenizer": expected}  # the first loader saw the file's choice, and stopped there


def test_names_from_the_file_cannot_leave_the_workspace_and_nothing_is_written_beside_it(tiny_neox, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = write(tmp_path, tiny_neox, name="My exp+1", run="A.1")  # the odd names the rules still allow
    before = sorted(p.name for p in tmp_path.iterdir())
    out = CliRunner().invoke(app, ["run", str(f), "-w", str(tmp_path / "ws")])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["ws"])
    runs = Store(tmp_path / "ws").all_runs()
    for rec in runs:  # run folders are named by hash, whatever the run is called
        assert Path(rec.adapter_path or tmp_path / "ws" / "runs").resolve().is_relative_to((tmp_path / "ws").resolve())
    for bad in ("../x", "a/b", ".hidden"):
        out = CliRunner().invoke(app, ["validate", str(write(tmp_path, tiny_neox, run=bad))])
        assert out.exit_code == 2 and "invalid run name" in out.output


HOSTILE = "[bold red]x[/] [link=https://evil.example]y[/link] <script>z</script>"


def test_model_and_user_text_is_printed_as_text_never_as_terminal_markup(tiny_neox, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per sample, so the text is not wrapped
    f = write(tmp_path, tiny_neox)
    ws = tmp_path / "ws"
    assert CliRunner().invoke(app, ["run", str(f), "-w", str(ws)]).exit_code == 0
    store = Store(ws)
    a = store.find("A")
    samples = [{**s, "prompt": HOSTILE, "outputs": {c: {**o, "text": HOSTILE} for c, o in s["outputs"].items()}}
               for s in a.samples]
    store.finish(a.id, metrics=a.metrics, curves=a.curves, samples=samples, timings=a.timings, adapter_path=a.adapter_path)
    out = CliRunner().invoke(app, ["show", "A", "-w", str(ws), "--samples", "1"])
    assert out.exit_code == 0, out.output
    assert out.output.count(HOSTILE) == 2, out.output  # prompt and output, literally: no style, link or swallowed tag


def test_an_error_text_holding_markup_does_not_break_the_run_loop(tiny_neox, tmp_path, monkeypatch):
    import loralab.engine.train as train_mod

    def broken(*args, **kwargs):
        raise RuntimeError(f"bad value {HOSTILE}")

    monkeypatch.setattr(train_mod, "train_lora", broken)
    monkeypatch.setenv("COLUMNS", "400")
    out = CliRunner().invoke(app, ["run", str(write(tmp_path, tiny_neox)), "-w", str(tmp_path / "ws")])
    assert out.exit_code == 1, out.output  # the run failed; the command did not crash on printing why
    assert f"A: failed: RuntimeError: bad value {HOSTILE}" in out.output
