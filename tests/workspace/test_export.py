"""`loralab export`: the adapter as PEFT loads it, or the merged model as transformers loads it, each
with its tokenizer and a model card whose code reproduces a stored sample on another machine; bad
`--out` or a lost base: one message, exit 2, nothing left behind."""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import loralab
from loralab.cli import app
from loralab.errors import SpecError
from loralab.workspace import export as export_mod

from test_runner import experiment


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    # batch_size 1: the stored samples are generated unpadded, as the card's code generates them
    runs = """
runs:
  A:
    lora: {r: 4, alpha: 8, target_modules: [q_proj, v_proj], use_dora: true}
    train: {learning_rate: 1.0e-2, batch_size: 2, max_steps: 4}
    generate: {max_new_tokens: 8, batch_size: 1}
"""
    exp = loralab.load(experiment(tmp, tiny_llama, runs, name="ex"))
    loralab.run(loralab.api.with_repeats(exp, 2), workspace=tmp / "ws")
    return tmp, tiny_llama


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([[3, 5, 7, 11, 13, 17]])).logits.float()


def code_of(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


def test_the_adapter_exports_in_peft_format_with_a_card(trained):
    tmp, base = trained
    out = CliRunner().invoke(app, ["export", "A", "--out", str(tmp / "adapter"), "-w", str(tmp / "ws"),
                                   "--base", "my-org/tiny-llama"])
    assert out.exit_code == 0, out.output
    assert "exported seed 0" in out.output and "--seed" in out.output  # two seeds: which one is said
    folder = tmp / "adapter"
    names = {f.name for f in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= names
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-org/tiny-llama"
    card = (folder / "README.md").read_text()
    assert card.startswith('---\nbase_model: "my-org/tiny-llama"') and "library_name: peft" in card
    assert "lora.use_dora: `True`" in card and "- eval_loss: " in card and "(seed 0)" in card
    assert "chat template" in card and "You summarize Python functions in one sentence." in card  # the data's system prompt
    assert "as the model saw it" in card and "<|im_start|>system\nYou summarize Python functions" in card
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    stored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), loralab.get_run("A", tmp / "ws").adapter_path)
    assert torch.equal(logits(model), logits(stored))


@pytest.mark.parametrize("merge", [False, True])
def test_the_cards_code_reproduces_the_stored_sample_from_a_copy_on_another_machine(trained, tmp_path, monkeypatch, capsys, merge):
    """The card's own snippet, run in a copy of the export with the base at another path (as the card
    says to substitute), answers the first held-out prompt exactly as the run stored it."""
    tmp, base = trained
    done = loralab.api.export("A", tmp_path / "export", merge=merge, workspace=tmp / "ws", seed=1)
    elsewhere = tmp_path / "other-machine"
    shutil.copytree(done.folder, elsewhere / "export")
    shutil.copytree(base, elsewhere / "base")
    card = (elsewhere / "export" / "README.md").read_text()
    code = code_of(card)
    if not merge:
        assert re.search(r'^BASE = ".*"  # the base model', code, re.M)
        code = re.sub(r'^BASE = .*$', f"BASE = {json.dumps(str(elsewhere / 'base'))}", code, flags=re.M)
    monkeypatch.chdir(elsewhere / "export")  # EXPORT = "." : the card is read in its folder
    rec = [r for r in loralab.api.get_group("A", tmp / "ws") if r.seed == 1][0]
    sample = next(s for s in rec.samples if s["outputs"])
    cap = max(sample["outputs"], key=int)
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed and printed == sample["outputs"][cap]["text"]
    assert f"```text\n{printed}\n```" in card  # what the card promises it prints


def test_the_merged_model_loads_without_peft_and_answers_as_the_adapter_does(trained):
    tmp, base = trained
    folder = loralab.api.export("A", tmp / "merged", merge=True, workspace=tmp / "ws").folder
    names = {f.name for f in folder.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names and not any(n.endswith(".bin") for n in names)
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in n for n, _ in merged.named_modules())
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), loralab.get_run("A", tmp / "ws").adapter_path)
    assert torch.allclose(logits(merged), logits(adapter), atol=1e-4, rtol=1e-4)  # merging only reorders float sums
    assert "library_name: transformers" in (folder / "README.md").read_text()


def test_the_built_in_model_is_named_by_its_hub_id_and_a_local_base_says_how_to_rename_it(trained):
    tmp, base = trained
    rec = loralab.get_run("A", tmp / "ws")
    assert export_mod.default_base(dataclasses.replace(rec, model={**rec.model, "name": "builtin:smollm2-135m"}))[0] \
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    named, note = export_mod.default_base(rec)
    assert named == str(base.resolve()) and "--base" in note


def test_a_chosen_seed_is_exported_and_an_unknown_one_lists_the_seeds(trained):
    tmp, _ = trained
    res = CliRunner().invoke(app, ["export", "A", "--seed", "7", "--out", str(tmp / "s7"), "-w", str(tmp / "ws")])
    assert res.exit_code == 2 and "no seed 7" in res.output and "0, 1" in res.output, res.output
    assert not (tmp / "s7").exists()
    res = CliRunner().invoke(app, ["export", "A", "--seed", "1", "--out", str(tmp / "s1"), "-w", str(tmp / "ws")])
    assert res.exit_code == 0 and "exported seed" not in res.output, res.output
    assert "(seed 1)" in (tmp / "s1" / "README.md").read_text()


def test_export_refuses_what_it_cannot_write(trained):
    tmp, _ = trained
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("mine")
    (tmp / "a-file").write_text("mine")
    for args, needle in [(["base", "--out", str(tmp / "fresh")], "has no adapter"),
                         (["A", "--out", str(tmp / "full")], "is not empty"),
                         (["A", "--out", str(tmp / "a-file")], "is a file"),
                         (["A", "--out", str(tmp / "a-file" / "sub")], "cannot write there"),
                         (["A", "--out", "/sys/loralab-export"], "cannot write there")]:
        res = CliRunner().invoke(app, ["export", *args, "-w", str(tmp / "ws")])
        assert res.exit_code == 2 and needle in res.output, (args, res.output)
        assert args[0] == "base" or "--out" in res.output
    assert (tmp / "full" / "keep.txt").read_text() == "mine" and not (tmp / "fresh").exists()
    assert (tmp / "a-file").read_text() == "mine"


@pytest.mark.parametrize("merge", [False, True])
def test_a_removed_base_folder_is_one_message_and_nothing_is_written(trained, tmp_path, merge):
    tmp, _ = trained
    rec = loralab.get_run("A", tmp / "ws")
    gone = dataclasses.replace(rec, model={**rec.model, "path": str(tmp_path / "removed-base")})
    with pytest.raises(SpecError, match="no longer at") as err:
        export_mod.export(gone, tmp_path / "out" / "merged", merge=merge)
    assert err.value.exit_code == 2
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_failure_while_writing_leaves_nothing_behind(trained, tmp_path, monkeypatch):
    tmp, _ = trained
    rec = loralab.get_run("A", tmp / "ws")

    def full_disk(rec, adapter, source, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_mod, "_merged", full_disk)
    (tmp_path / "out").mkdir()  # an empty folder given as --out stays as it was
    with pytest.raises(OSError):
        export_mod.export(rec, tmp_path / "out", merge=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any((tmp_path / "out").iterdir())

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(export_mod.tempfile, "mkdtemp", read_only)
    with pytest.raises(SpecError, match="cannot write there"):
        export_mod.export(rec, tmp_path / "ro", merge=True)
    assert not (tmp_path / "ro").exists()


def test_a_run_name_two_experiments_share_says_which_was_picked(trained, tmp_path):
    tmp, base = trained
    ws = tmp_path / "ws"
    for name, steps in (("first", 2), ("second", 3)):
        runs = f"runs:\n  A:\n    train: {{max_steps: {steps}, batch_size: 2}}\n    generate: {{max_new_tokens: 2}}\n"
        loralab.run(loralab.load(experiment(tmp_path, base, runs, name=name)), workspace=ws)
    res = CliRunner().invoke(app, ["show", "A", "-w", str(ws)])
    assert res.exit_code == 0 and "2 experiments have a run 'A'" in res.output and "--experiment first" in res.output, res.output
    assert "second/A" in res.output
    res = CliRunner().invoke(app, ["show", "A", "--experiment", "first", "-w", str(ws)])
    assert res.exit_code == 0 and "first/A" in res.output and "experiments have" not in res.output, res.output
    done = loralab.api.export("A", tmp_path / "out", workspace=ws, experiment="first")
    assert "# first/A" in (done.folder / "README.md").read_text()
    assert not any("experiments have" in n for n in done.notes)


def test_a_hub_base_loaded_at_a_revision_is_named_with_it(trained, tmp_path):
    tmp, _ = trained
    rec = loralab.get_run("A", tmp / "ws")
    hub = dataclasses.replace(rec, model={**rec.model, "name": "org/model", "fingerprint": "hub-org/model@abc123"})
    assert export_mod.hub_revision(hub) == "abc123" and export_mod.hub_revision(rec) is None
    assert export_mod.hub_revision(dataclasses.replace(rec, model={**rec.model, "fingerprint": "hub-org/model@main"})) is None
    done = export_mod.export(hub, tmp_path / "out", base="org/model")
    assert json.loads((done.folder / "adapter_config.json").read_text())["revision"] == "abc123"
    assert 'from_pretrained(BASE, dtype=torch.float32, revision="abc123")' in (done.folder / "README.md").read_text()
