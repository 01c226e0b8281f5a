"""Start-up stays cheap: `loralab --help` and `loralab validate` do not import the heavy libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from loralab.engine.models import ModelLayers, cached_layers, remember_layers, resolve_target_modules

PROBE = """
import sys
from typer.testing import CliRunner
from loralab.cli import app
out = CliRunner().invoke(app, {args!r})
print(out.exit_code, sorted(m for m in ("torch", "transformers", "peft", "optuna", "sqlalchemy", "matplotlib")
                            if m in sys.modules))
"""


def imported_by(args: list[str], env: dict) -> tuple[int, list[str]]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, env=env,
                         check=True)
    code, mods = out.stdout.strip().splitlines()[-1].split(" ", 1)
    return int(code), eval(mods)


def experiment(tmp_path: Path, model: Path) -> Path:
    f = tmp_path / "exp.yaml"
    f.write_text(f"name: e\nmodel: {model}\ndata: {{builtin: stdlib-docstrings, train_size: 4, eval_size: 2}}\n"
                 "runs:\n  A: {lora: {r: 4, target_modules: [query_key_value]}}\n")
    return f


def test_help_imports_no_heavy_library():
    assert imported_by(["--help"], dict(os.environ)) == (0, [])


def test_validate_reads_recorded_layers_instead_of_importing_torch(tiny_llama, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    f = experiment(tmp_path, tiny_llama)
    # First time: no record, so a weightless model is built from the config (torch), and recorded.
    code, mods = imported_by(["validate", str(f)], env)
    assert code == 0 and "torch" in mods
    assert len(list((tmp_path / "cache" / "loralab" / "layers").glob("*.json"))) == 1
    code, mods = imported_by(["validate", str(f)], env)
    assert code == 0 and mods == []


def test_a_layer_record_belongs_to_one_exact_folder(tiny_llama, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    assert cached_layers(folder) is None
    remember_layers(folder, ModelLayers("llama", ("k_proj", "q_proj", "v_proj")))
    assert cached_layers(folder) == ModelLayers("llama", ("k_proj", "q_proj", "v_proj"))
    targets, note = resolve_target_modules(cached_layers(folder), ["query_key_value"])
    assert targets == ["q_proj", "k_proj", "v_proj"] and "llama" in note
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    assert cached_layers(folder) is None  # another config: another model
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    remember_layers(folder, ModelLayers("llama", ("q_proj",)))
    assert cached_layers(folder) is None  # its own code decides its layers: always ask transformers
