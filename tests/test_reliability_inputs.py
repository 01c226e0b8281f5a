"""Bad input, as a table: every case must give one message that names the place (file:line or field
path), the value and the fix, exit with code 2, and write nothing to the workspace.

docs/reliability.md lists the same cases with the message each one gets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loralab.cli import app

MODEL = "@MODEL@"  # replaced by the tiny model's folder
HEAD = f"name: bad\nmodel: {MODEL}\ndata: {{builtin: stdlib-docstrings, train_size: 8, eval_size: 2}}\nevaluation: {{drift: false}}\n"
RUN = "runs:\n  A: {lora: {r: 2}, train: {max_steps: 2}, generate: {max_new_tokens: 4}}\n"


def exp(body: str = RUN, data: str | None = None, head: str = HEAD) -> str:
    if data is not None:
        head = head.replace("{builtin: stdlib-docstrings, train_size: 8, eval_size: 2}", data)
    return head + body


def jsonl(*rows) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


OK = {"instruction": "Say hi.", "output": "Hi."}
# 616 bytes of YAML that expand to 9**9 strings (the billion laughs).
BOMB = "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
               for p, c in zip([""] + list("abcdefgh"), "abcdefghi"))
SWEEP = "sweep:\n  strategy: grid\n  space: {space}\n"


@dataclass
class Case:
    id: str
    files: dict[str, str | bytes]  # written into the test's folder; "exp.yaml" is the experiment
    args: list[str]  # after the command name; "exp.yaml" and "-w ws" are added for run/validate/sweep
    needles: list[str]  # each must appear in the one error message
    command: str = "run"
    existing_workspace: bool = False  # the command reads a finished workspace, which must stay as it was
    setup: str | None = None  # name of a function below that adds what plain text cannot


CASES = [
    # -- the experiment file ------------------------------------------------------------------
    Case("unknown top-level key", {"exp.yaml": exp() + "modle: x\n"}, [],
         ["modle (line 7)", "unknown key", "'x'", "Fix: remove it or check its spelling; allowed here: name, model"]),
    Case("unknown nested key", {"exp.yaml": exp("runs:\n  A: {lora: {rank: 4}}\n")}, [],
         ["runs.A.lora.rank (line 6)", "unknown key", "(got 4)", "allowed here: r, alpha, dropout"]),
    Case("wrong type", {"exp.yaml": exp("runs:\n  A: {train: {batch_size: two}}\n")}, [],
         ["runs.A.train.batch_size (line 6)", "'two'", "Fix: use a whole number"]),
    Case("rank 0", {"exp.yaml": exp("runs:\n  A: {lora: {r: 0}}\n")}, [],
         ["runs.A.lora.r (line 6)", "(got 0)", "Fix: use a value above 0"]),
    Case("alpha 0", {"exp.yaml": exp("runs:\n  A: {lora: {alpha: 0}}\n")}, [],
         ["runs.A.lora.alpha (line 6)", "(got 0)", "Fix: use a value above 0"]),
    Case("alpha < 0 in defaults", {"exp.yaml": exp("defaults:\n  lora: {alpha: -8}\n" + RUN)}, [],
         ["defaults.lora.alpha (line 6)", "(got -8)", "Fix: use a value above 0"]),
    Case("dropout 1", {"exp.yaml": exp("runs:\n  A: {lora: {dropout: 1.0}}\n")}, [],
         ["runs.A.lora.dropout (line 6)", "(got 1.0)", "Fix: use a value below 1"]),
    Case("learning rate 2", {"exp.yaml": exp("runs:\n  A: {train: {learning_rate: 2}}\n")}, [],
         ["runs.A.train.learning_rate (line 6)", "(got 2)", "Fix: use a value below 1"]),
    Case("negative max_steps", {"exp.yaml": exp("runs:\n  A: {train: {max_steps: -5}}\n")}, [],
         ["runs.A.train.max_steps (line 6)", "(got -5)", "Fix: use a value above 0"]),
    Case("empty run list", {"exp.yaml": exp("runs: {}\n")}, [],
         ["runs (line 5)", "no runs declared", "Fix: add at least one named run"]),
    Case("duplicate run names", {"exp.yaml": exp("runs:\n  A: {lora: {r: 2}}\n  B: {}\n  A: {lora: {r: 4}}\n")}, [],
         ["runs.A (line 8)", "duplicate key, first given on line 6", "(got 'A')", "Fix: give each key once"]),
    Case("run name escaping the workspace", {"exp.yaml": exp("runs:\n  ../x: {}\n")}, [],
         ["runs.../x", "invalid run name", "(got '../x')", "Fix: use 1 to 64 ASCII letters, digits"]),
    Case("reserved run name", {"exp.yaml": exp("runs:\n  base: {}\n")}, [],
         ["runs.base", "(got 'base')", "'base' is reserved"]),
    Case("experiment name with a path", {"exp.yaml": "name: ../../etc/x\n" + exp().split("\n", 1)[1]}, [],
         ["name (line 1)", "not a plain name", "(got '../../etc/x')", "Fix: use 1 to 128 ASCII letters, digits"]),
    Case("unknown device", {"exp.yaml": exp() + "device: gpu\n"}, [],
         ["device (line 7)", "(got 'gpu')", "Fix: use one of 'auto', 'cpu' or 'cuda'"]),
    Case("both warmups", {"exp.yaml": exp("runs:\n  A: {train: {warmup_steps: 2, warmup_ratio: 0.1}}\n")}, [],
         ["runs.A.train (line 6)", "set warmup_steps or warmup_ratio, not both"]),
    Case("seeds repeated", {"exp.yaml": exp() + "seeds: [0, 0]\n"}, [],
         ["(file)", "seeds must be different from each other"]),
    Case("YAML syntax", {"exp.yaml": exp("runs:\n  A: {lora: {r: 4}\n  B: {}\n")}, [],
         ["exp.yaml:7", "not valid YAML", "Fix: check indentation and colons near that line"]),
    Case("experiment file not UTF-8", {"exp.yaml": exp().encode() + b"# caf\xe9\n"}, [],
         ["exp.yaml:7", "not UTF-8 text", "(got b'\\xe9\\n')", "Fix: save the file as UTF-8"]),
    Case("top level not a mapping", {"exp.yaml": "- A\n- B\n"}, [],
         ["(file)", "top level is not a mapping", "(got 'list')", "Fix: start with keys such as `model:`"]),
    Case("experiment file missing", {}, [], ["exp.yaml", "file not found", "Fix: check the path"]),
    Case("sweep: empty choice", {"exp.yaml": exp() + SWEEP.format(space="{lora.r: []}")}, [],
         ["sweep.space.lora.r (line 9)", "no choices to try: give at least one value", "(got [])"], command="sweep"),
    Case("sweep: linked knob pointing nowhere",
         {"exp.yaml": exp() + SWEEP.format(space="{lora.r: [2], lora.alpha: {ratio_of: lora.rank, values: [1, 2]}}")}, [],
         ["sweep.space.lora.alpha.ratio_of (line 9)", "(got 'lora.rank')", "Fix: add lora.rank to sweep.space"],
         command="sweep"),
    Case("sweep: unknown knob", {"exp.yaml": exp() + SWEEP.format(space="{lora.rank: [2, 4]}")}, [],
         ["sweep.space.lora.rank (line 9)", "unknown knob", "Fix: use a field of lora, train or generate"], command="sweep"),
    Case("sweep: no sweep section", {"exp.yaml": exp()}, [],
         ["sweep", "missing", "Fix: add `sweep: {space:"], command="sweep"),
    # -- data ---------------------------------------------------------------------------------
    Case("data file missing", {"exp.yaml": exp(data="{path: nowhere.jsonl}")}, [],
         ["data.path", "file not found", "(got 'nowhere.jsonl')", "Fix: give a JSONL or CSV file"]),
    Case("data file empty", {"exp.yaml": exp(data="{path: d.jsonl}"), "d.jsonl": "\n\n"}, [],
         ["data.path", "empty file", "d.jsonl", "Fix: add one example per line"]),
    Case("broken JSON line", {"exp.yaml": exp(data="{path: d.jsonl}"), "d.jsonl": jsonl(OK, OK, '{"instruction": "x", "output": }', OK)}, [],
         ["d.jsonl:3", "not valid JSON (Expecting value at column 32)", "'{\"instruction\": \"x\", \"output\": }'",
          "Fix: write one JSON object per line"]),
    Case("missing field", {"exp.yaml": exp(data="{path: d.jsonl}"), "d.jsonl": jsonl(OK, {"instruction": "x", "answer": "y"}, OK)}, [],
         ["d.jsonl:2", "row has no field 'output'", "(got ['answer', 'instruction'])", "Fix: add 'output' to every row"]),
    Case("empty field", {"exp.yaml": exp(data="{path: d.jsonl}"), "d.jsonl": jsonl(OK, {"instruction": "x", "output": " "}, OK)}, [],
         ["d.jsonl:2", "field 'output' must be non-empty text", "(got ' ')", "Fix: give 'output' a text value"]),
    Case("data not UTF-8", {"exp.yaml": exp(data="{path: d.jsonl}"),
                            "d.jsonl": jsonl(OK).encode() + b'{"instruction": "caf\xe9", "output": "x"}\n'}, [],
         ["d.jsonl:2", "not UTF-8 text", "(got b'\\xe9\", \"out')", "Fix: save the file as UTF-8"]),
    Case("CSV row with extra cells", {"exp.yaml": exp(data="{path: d.csv}"), "d.csv": "instruction,output\na,b\nc,d,e\n"}, [],
         ["d.csv:3", "row has 3 cells but the header has 2", "(got ['e'])", "Fix: quote cells that contain commas"]),
    Case("unknown data file type", {"exp.yaml": exp(data="{path: d.txt}"), "d.txt": "hello\n"}, [],
         ["data.path", "unknown file type", "(got '.txt')", "Fix: use .jsonl"]),
    Case("too few examples to split", {"exp.yaml": exp(data="{path: d.jsonl}"), "d.jsonl": jsonl(OK)}, [],
         ["data.eval_fraction", "the eval split would be empty", "(got 1)", "Fix: add examples, or give a separate eval set"]),
    Case("eval file empty", {"exp.yaml": exp(data="{path: d.jsonl, eval_path: e.jsonl}"), "d.jsonl": jsonl(OK, OK), "e.jsonl": ""}, [],
         ["data.eval_path", "empty file", "e.jsonl", "Fix: add one example per line"]),
    Case("eval split empty (datasets folder)", {"exp.yaml": exp(data="{hf: ds, eval_split: test}"),
                                                "ds/train.jsonl": jsonl(OK, OK), "ds/test.jsonl": ""}, [],
         ["data.hf", "cannot load (ValueError)", "\"test\" corresponds to no data", "(got 'ds')",
          "Fix: check the id, hf_config and that every split has rows"]),
    Case("example longer than max_seq_len",
         {"exp.yaml": exp("runs:\n  A: {train: {max_seq_len: 64, max_steps: 2}}\n", data="{path: d.jsonl}"),
          "d.jsonl": jsonl(OK, OK, {"instruction": "Say it all.", "output": "word " * 80}, OK, OK)}, [],
         ["d.jsonl:3", "example is", "tokens, longer than runs.A.train.max_seq_len (64)",
          "Fix: raise runs.A.train.max_seq_len to at least", "data.truncate: true"]),
    # -- models -------------------------------------------------------------------------------
    Case("unknown model id, offline", {"exp.yaml": exp().replace(MODEL, "nobody-xyz/no-such-model")}, [],
         ["model.name", "(got 'nobody-xyz/no-such-model')", "HF_HUB_OFFLINE=1", "Fix: download it where there is network"]),
    Case("model folder without weights", {"exp.yaml": exp().replace(MODEL, "nw")}, [],
         ["model.name", "no *.safetensors file", "nw'", "Fix: save the model with save_pretrained first"], setup="no_weights"),
    Case("model folder with pickle weights only", {"exp.yaml": exp().replace(MODEL, "pk")}, [],
         ["model.name", "refusing to load pickle weights (they can run code)", "pk'", "Fix: convert them to safetensors"],
         setup="pickle_only"),
    Case("model folder without config", {"exp.yaml": exp().replace(MODEL, "empty"), "empty/README.md": "hi\n"}, [],
         ["model.name", "not a transformers model folder", "empty'", "Fix: give a folder saved with save_pretrained"]),
    Case("model folder missing", {"exp.yaml": exp().replace(MODEL, "./nope")}, [],
         ["model.name", "folder not found", "(got './nope')", "Fix: check the path"]),
    Case("unknown built-in model", {"exp.yaml": exp().replace(MODEL, "builtin:gpt-9")}, [],
         ["model.name", "unknown built-in model", "(got 'builtin:gpt-9')", "Fix: use builtin:smollm2-135m"]),
    Case("model needing its own code", {"exp.yaml": exp().replace(MODEL, "evil")}, [],
         ["model.trust_remote_code", "(got 'evil')", "Fix: only if you trust that code"], setup="remote_code"),
    Case("target modules matching nothing", {"exp.yaml": exp("runs:\n  A: {lora: {target_modules: [attn_out]}}\n")}, [],
         ["runs.A.lora.target_modules", "no linear layer has this name", "(got 'attn_out')", "Fix: use some of: dense"]),
    Case("validate: target modules matching nothing", {"exp.yaml": exp("runs:\n  A: {lora: {target_modules: [attn_out]}}\n")}, [],
         ["runs.A.lora.target_modules", "(got 'attn_out')", "Fix: use some of: dense"], command="validate"),
    Case("validate: model folder with pickle weights only", {"exp.yaml": exp().replace(MODEL, "pk")}, [],
         ["model.name", "refusing to load pickle weights", "Fix: convert them to safetensors"],
         command="validate", setup="pickle_only"),
    # -- round two (issue 14): what validate passes must run ----------------------------------
    # Each once as its own command (run or sweep) and once through `validate`, which must find it too.
    *[Case(id_ if cmd == "run" else f"validate: {id_}", files, args, needles,
           command="validate" if cmd == "validate" else command, setup=setup)
      for cmd in ("run", "validate")
      for id_, files, args, needles, command, setup in [
        ("epochs .inf", {"exp.yaml": exp("runs:\n  A: {train: {epochs: .inf}}\n")}, [],
         ["runs.A.train.epochs (line 6)", "finite number", "(got inf)", "Fix: use a finite number"], "run", None),
        ("alpha .inf", {"exp.yaml": exp("runs:\n  A: {lora: {alpha: .inf}}\n")}, [],
         ["runs.A.lora.alpha (line 6)", "finite number", "(got inf)", "Fix: use a finite number"], "run", None),
        ("learning rate .nan", {"exp.yaml": exp("defaults:\n  train: {learning_rate: .nan}\n" + RUN)}, [],
         ["defaults.train.learning_rate (line 6)", "finite number", "(got nan)", "Fix: use a finite number"], "run", None),
        ("weight decay -.inf", {"exp.yaml": exp("runs:\n  A: {train: {weight_decay: -.inf}}\n")}, [],
         ["runs.A.train.weight_decay (line 6)", "finite number", "Fix: use a finite number"], "run", None),
        ("price per hour .inf", {"exp.yaml": exp() + "cost: {per_hour: .inf}\n"}, [],
         ["cost.per_hour (line 7)", "finite number", "Fix: use a finite number"], "run", None),
        ("24-digit seed", {"exp.yaml": exp("runs:\n  A: {train: {seed: 123456789012345678901234}}\n")}, [],
         ["runs.A.train.seed (line 6)", "(got 123456789012345678901234)", "Fix: use a value of at most 2147483647"], "run", None),
        ("negative seed in seeds", {"exp.yaml": exp() + "seeds: [1, -3]\n"}, [],
         ["seeds.1 (line 7)", "(got -3)", "Fix: use a value of at least 0"], "run", None),
        ("huge max_steps", {"exp.yaml": exp("runs:\n  A: {train: {max_steps: 99999999999999}}\n")}, [],
         ["runs.A.train.max_steps (line 6)", "too large", "Fix: use at most 2147483647"], "run", None),
        ("data: only blank lines", {"exp.yaml": exp(data="{path: d.jsonl}"), "d.jsonl": "\n   \n\n"}, [],
         ["data.path", "empty file: only blank lines", "Fix: add one example per line"], "run", None),
        ("data: header-only CSV", {"exp.yaml": exp(data="{path: d.csv}"), "d.csv": "instruction,output\n"}, [],
         ["data.path", "empty file: only a header row", "Fix: add one example per line"], "run", None),
        ("data: an answer that is a list", {"exp.yaml": exp(data="{path: d.jsonl}"),
                                            "d.jsonl": jsonl(OK, {"instruction": "x", "output": ["a", "b"]}, OK)}, [],
         ["d.jsonl:2", "field 'output' must be non-empty text", "(got ['a', 'b'])", "Fix: give 'output' a text value"], "run", None),
        ("data: NaN literal", {"exp.yaml": exp(data="{path: d.jsonl}"),
                               "d.jsonl": jsonl(OK, '{"instruction": "x", "output": NaN}', OK)}, [],
         ["d.jsonl:2", "holds NaN, which JSON does not allow", "Fix: write the value as a quoted text"], "run", None),
        ("data: Infinity in an array file", {"exp.yaml": exp(data="{path: d.json}"),
                                             "d.json": '[{"instruction": "x", "output": Infinity}, {"instruction": "y", "output": "z"}]'}, [],
         ["d.json", "holds Infinity, which JSON does not allow", "Fix: write the value as a quoted text"], "run", None),
        ("data: the path is a folder", {"exp.yaml": exp(data="{path: d.jsonl}"), "d.jsonl/x": "y"}, [],
         ["data.path", "a folder, not a file", "(got 'd.jsonl')", "Fix: give a JSONL or CSV file"], "run", None),
        ("weights truncated", {"exp.yaml": exp().replace(MODEL, "bm")}, [],
         ["model.name", "not a complete safetensors file (corrupt or truncated)", "bm'", "Fix: download or save the weights again"],
         "run", "truncated_weights"),
        ("weights not safetensors at all", {"exp.yaml": exp().replace(MODEL, "bm")}, [],
         ["model.name", "not a complete safetensors file", "Fix: download or save the weights again"], "run", "garbage_weights"),
        ("config shapes do not match the weights", {"exp.yaml": exp().replace(MODEL, "bm")}, [],
         ["model.name", "in the weights but", "by config.json", "Fix: use the config.json saved together with these weights"],
         "run", "wider_config"),
        ("weights holding none of the model's tensors", {"exp.yaml": exp().replace(MODEL, "bm")}, [],
         ["model.name", "no tensor of the model in the weights", "'foo.weight'", "Fix: give the folder save_pretrained wrote"],
         "run", "unrelated_weights"),
        ("weights missing half the tensors", {"exp.yaml": exp().replace(MODEL, "bm")}, [],
         ["model.name", "tensor(s) missing from the weights", "Fix: save the whole model again"], "run", "half_weights"),
        ("config.json not JSON", {"exp.yaml": exp().replace(MODEL, "bm")}, [],
         ["model.name", "transformers cannot read this config.json", "Fix: check config.json"], "run", "config_not_json"),
        ("tokenizer.json broken", {"exp.yaml": exp().replace(MODEL, "bm")}, [],
         ["model.name", "transformers cannot load this tokenizer", "Fix: check tokenizer.json"], "run", "broken_tokenizer"),
        ("model path is a file", {"exp.yaml": exp().replace(MODEL, "./weights.bin"), "weights.bin": "x"}, [],
         ["model.name", "not a folder", "(got './weights.bin')", "Fix: give the folder save_pretrained wrote"], "run", None),
        ("sweep: fractional step of a whole-number knob",
         {"exp.yaml": exp() + "sweep:\n  strategy: random\n  space: {lora.r: {low: 2, high: 8, step: 1.5}}\n  budget: {trials: 2}\n"}, [],
         ["sweep.space.lora.r.step (line 9)", "a whole-number knob needs a whole step", "(got 1.5)", "Fix: use a step of 1"],
         "sweep", None),
        ("sweep: unknown storage scheme", {"exp.yaml": exp() + SWEEP.format(space="{lora.r: [2]}") + "  storage: nosuch://x\n"}, [],
         ["sweep.storage (line 10)", "not a database URL", "(got 'nosuch://x')", "Fix: use sqlite:///"], "sweep", None),
        ("sweep: storage in a missing folder", {"exp.yaml": exp() + SWEEP.format(space="{lora.r: [2]}") + "  storage: sqlite:////nonexistent-dir/o.db\n"}, [],
         ["sweep.storage (line 10)", "does not exist", "Fix: create it first"], "sweep", None),
        ("sweep: objective no run records", {"exp.yaml": exp() + SWEEP.format(space="{lora.r: [2]}") + "  objective: rouge_l@99\n"}, [],
         ["sweep.objective (line 10)", "no trial records this metric", "(got 'rouge_l@99')", "Fix: use one of:"], "sweep", None),
        ("sweep: drift objective with drift off", {"exp.yaml": exp() + SWEEP.format(space="{lora.r: [2]}") + "  objective: drift_kl\n"}, [],
         ["sweep.objective (line 10)", "no trial records this metric", "(got 'drift_kl')"], "sweep", None),
        ("sweep: negative seed", {"exp.yaml": exp() + SWEEP.format(space="{lora.r: [2]}") + "  seed: -1\n"}, [],
         ["sweep.seed (line 10)", "(got -1)", "Fix: use a value of at least 0"], "sweep", None),
        ("sweep: .nan among the choices", {"exp.yaml": exp() + SWEEP.format(space="{train.learning_rate: [1e-3, .nan]}")}, [],
         ["sweep.space.train.learning_rate", "finite number", "Fix:"], "sweep", None),
        # -- plans that cannot finish
        ("sweep: a grid of 110,000 points", {"exp.yaml": exp() + SWEEP.format(space="{" + ", ".join(
            f"{k}: {list(range(1, n + 1))}" for k, n in (("lora.r", 11), ("train.max_steps", 10), ("train.batch_size", 10),
                                                         ("generate.batch_size", 10), ("train.gradient_accumulation", 10))) + "}")}, [],
         ["sweep.space (line 9)", "a grid of 110,000 points", "Fix: keep a grid under 100,000 points"], "sweep", None),
        ("epochs 1e12", {"exp.yaml": exp("runs:\n  A: {train: {epochs: 1.0e12}}\n")}, [],
         ["runs.A.train.epochs", "optimizer steps", "(got 1000000000000.0)", "Fix: lower it"], "run", None),
        ("warmup far above the planned steps", {"exp.yaml": exp("runs:\n  A: {train: {max_steps: 2, warmup_steps: 1000}}\n")}, [],
         ["runs.A.train.warmup_steps", "above the 2 planned steps", "(got 1000)", "Fix: use at most 2"], "run", None),
        ("max_new_tokens far above the context", {"exp.yaml": exp("runs:\n  A: {train: {max_steps: 2}, generate: {max_new_tokens: 100000}}\n")}, [],
         ["runs.A.generate.max_new_tokens", "above the model's context of 512 tokens", "(got 100000)", "Fix: use at most 512"],
         "run", None),
        ("max_seq_len above the context", {"exp.yaml": exp("runs:\n  A: {train: {max_steps: 2, max_seq_len: 4096}}\n")}, [],
         ["runs.A.train.max_seq_len", "above the model's context of 512", "(got 4096)", "Fix: use at most 512"], "run", None),
        ("rank above the layer width", {"exp.yaml": exp("runs:\n  A: {lora: {r: 64}, train: {max_steps: 2}}\n")}, [],
         ["runs.A.lora.r", "above the width 32 of the targeted layers", "(got 64)", "Fix: use at most 32"], "run", None),
        ("drift answers above the context", {"exp.yaml": exp(head=HEAD.replace("{drift: false}", "{drift_max_new_tokens: 100000}"))}, [],
         ["evaluation.drift_max_new_tokens", "above the model's context", "(got 100000)", "Fix: use at most 512"], "run", None),
        ("a billion bootstrap resamples", {"exp.yaml": exp(head=HEAD.replace("{drift: false}", "{drift: false, bootstrap_resamples: 1000000000}"))}, [],
         ["evaluation.bootstrap_resamples (line 4)", "(got 1000000000)", "Fix: use a value of at most 100000"], "run", None),
        ("sweep trials of 1e12 epochs", {"exp.yaml": exp("runs:\n  A: {train: {epochs: 1}}\n") + "sweep:\n  strategy: grid\n  space: {train.epochs: [1, 1.0e12]}\n"}, [],
         ["sweep.space.train.epochs", "optimizer steps", "Fix: lower it"], "sweep", None),
        # -- hostile YAML
        ("recursive alias", {"exp.yaml": exp() + "x: &a [*a]\n"}, [],
         ["exp.yaml", "recursive alias", "Fix: write the values out, without aliases"], "run", None),
        ("alias bomb", {"exp.yaml": exp() + BOMB}, [],
         ["exp.yaml", "alias bomb", "Fix: write the values out, without aliases"], "run", None),
        ("nesting 5000 deep", {"exp.yaml": exp() + "x: " + "[" * 5000 + "]" * 5000 + "\n"}, [],
         ["exp.yaml", "nested", "Fix: an experiment file nests a few levels"], "run", None),
        ("a 2 MB experiment file", {"exp.yaml": exp() + ("# " + "x" * 98 + "\n") * 20000}, [],
         ["exp.yaml", "more than 1,000,000", "Fix: keep data in data files"], "run", None),
        ("a huge value is shown shortened", {"exp.yaml": exp("runs:\n  A: {lora: {rank: " + "x" * 5000 + "}}\n")}, [],
         ["runs.A.lora.rank (line 6)", "unknown key", " … "], "run", None),
        ("a key of 1000 characters", {"exp.yaml": exp() + "k" * 1000 + ": 1\n"}, [],
         ["kkkk…", "unknown key", "Fix: remove it or check its spelling"], "run", None),
        ("a number of 5000 digits", {"exp.yaml": exp("runs:\n  A: {lora: {r: " + "9" * 5000 + "}}\n")}, [],
         ["exp.yaml", "a number far too long to be a setting", "Fix: check the file"], "run", None),
        # -- messages that pointed the wrong way
        ("experiment file is a folder", {"exp.yaml/x": "y"}, [],
         ["exp.yaml", "a folder, not a file", "Fix: give the path of a YAML experiment file"], "run", None),
        ("run name with a trailing newline", {"exp.yaml": exp('runs:\n  "A\\n": {}\n')}, [],
         ["runs.'A\\n'", "invalid run name", "Fix: use 1 to 64 ASCII letters"], "run", None),
        ("run name of 65 characters", {"exp.yaml": exp("runs:\n  " + "a" * 65 + ": {}\n")}, [],
         ["invalid run name", "Fix: use 1 to 64 ASCII letters"], "run", None),
        ("run name not ASCII", {"exp.yaml": exp("runs:\n  Lauf-ä: {}\n")}, [],
         ["runs.Lauf-ä", "invalid run name", "Fix: use 1 to 64 ASCII letters"], "run", None),
        ("all-linear with other names", {"exp.yaml": exp("runs:\n  A: {lora: {target_modules: [all-linear, q_proj]}}\n")}, [],
         ["runs.A.lora.target_modules (line 6)", "all-linear already means every linear layer", "Fix: write `target_modules: all-linear` alone"],
         "run", None),
        ("a run with no settings (A:)", {"exp.yaml": exp("runs:\n  A:\n")}, [],
         ["runs.A (line 6)", "not a mapping of settings", "(got None)", "Fix: write a mapping of settings"], "run", None),
        ("a run that is a number (A: 5)", {"exp.yaml": exp("runs:\n  A: 5\n")}, [],
         ["runs.A (line 6)", "not a mapping of settings", "(got 5)", "Fix: write a mapping of settings"], "run", None),
        ("a section that is a number", {"exp.yaml": exp() + "cost: 3\n"}, [],
         ["cost (line 7)", "not a mapping of settings", "(got 3)", "Fix: write a mapping of its settings (per_hour, currency)"],
         "run", None),
        ("sweep: a knob given as a bare number", {"exp.yaml": exp() + SWEEP.format(space="{lora.r: 4}")}, [],
         ["sweep.space.lora.r (line 9)", "(got 4)", "Fix: give a list of choices"], "sweep", None),
        ("sweep: a fractional choice of a whole-number knob", {"exp.yaml": exp() + SWEEP.format(space="{lora.r: [4, 8.5]}")}, [],
         ["sweep.space.lora.r", "a trial would be invalid", "8.5"], "sweep", None),
        ("an empty experiment file", {"exp.yaml": ""}, [], ["exp.yaml: the file is empty", "Fix: add at least `runs:"], "run", None),
        ("comments only", {"exp.yaml": "# nothing yet\n"}, [], ["the file is empty", "Fix: add at least `runs:"], "run", None),
      ]],
    Case("show an unknown experiment's run", {}, ["nope/A"],
         ["run", "unknown experiment", "(got 'nope/A')", "Fix: use one of: bad"], command="show", existing_workspace=True),
    Case("report --out an unwritable folder", {}, ["A", "--out", "/sys/loralab-report"],
         ["--out", "cannot write there", "Fix: give a folder you can write to"], command="report", existing_workspace=True),
    # -- the command line ---------------------------------------------------------------------
    Case("--only names an unknown run", {"exp.yaml": exp()}, ["--only", "A,Z"],
         ["--only", "unknown run", "(got 'Z')", "Fix: use some of: A"]),
    Case("--repeats with the file's seeds", {"exp.yaml": exp() + "seeds: [0, 1]\n"}, ["--repeats", "3"],
         ["--repeats", "the file lists its seeds", "(got 3)", "Fix: drop --repeats or the file's seeds"]),
    Case("compare a run that does not exist", {}, ["A", "Z"],
         ["run", "unknown run name or id", "(got 'Z')", "Fix: use one of: A, base"], command="compare", existing_workspace=True),
    Case("show a run that does not exist", {}, ["Z"],
         ["run", "unknown run name or id", "(got 'Z')", "Fix: use one of: A, base"], command="show", existing_workspace=True),
    Case("ls without a workspace", {}, [], ["workspace", "no loralab.db in this folder", "Fix: run an experiment first"],
         command="ls"),
    Case("doctor without a workspace", {}, [], ["workspace", "no loralab.db in this folder", "Fix: run an experiment first"],
         command="doctor"),
]


# -- setups that need more than text files ---------------------------------------------------


def no_weights(tmp: Path, model: Path) -> None:
    folder = tmp / "nw"
    folder.mkdir()
    for f in model.iterdir():
        if not f.name.endswith(".safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())


def pickle_only(tmp: Path, model: Path) -> None:
    no_weights(tmp, model)
    (tmp / "nw").rename(tmp / "pk")
    (tmp / "pk" / "pytorch_model.bin").write_bytes(b"not even read")


def remote_code(tmp: Path, model: Path) -> None:
    write_remote_code_model(tmp / "evil", model, tmp / "PWNED")


def write_remote_code_model(folder: Path, model: Path, marker: Path) -> None:
    """A model folder whose config needs its own Python code, which would create `marker` if it ever ran."""
    folder.mkdir()
    for f in model.iterdir():
        if f.name != "config.json":
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evilnet", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evilnet'\n"
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)


def _bad_model(tmp: Path, model: Path) -> Path:
    import shutil

    shutil.copytree(model, tmp / "bm")
    return tmp / "bm" / "model.safetensors"


def truncated_weights(tmp: Path, model: Path) -> None:
    w = _bad_model(tmp, model)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def garbage_weights(tmp: Path, model: Path) -> None:
    _bad_model(tmp, model).write_bytes(b"\x00\x01 not safetensors" * 20)


def wider_config(tmp: Path, model: Path) -> None:
    _bad_model(tmp, model)
    cfg = json.loads((tmp / "bm" / "config.json").read_text())
    (tmp / "bm" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))


def unrelated_weights(tmp: Path, model: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(2, 2)}, str(_bad_model(tmp, model)))


def half_weights(tmp: Path, model: Path) -> None:
    from safetensors.torch import load_file, save_file

    w = _bad_model(tmp, model)
    tensors = load_file(str(w))
    save_file({k: tensors[k] for k in sorted(tensors)[: len(tensors) // 2]}, str(w))


def config_not_json(tmp: Path, model: Path) -> None:
    _bad_model(tmp, model)
    (tmp / "bm" / "config.json").write_text("{not json")


def broken_tokenizer(tmp: Path, model: Path) -> None:
    _bad_model(tmp, model)
    (tmp / "bm" / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')


SETUPS = {f.__name__: f for f in (no_weights, pickle_only, remote_code, truncated_weights, garbage_weights, wider_config,
                                  unrelated_weights, half_weights, config_not_json, broken_tokenizer)}


# -- the test ---------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_workspace(tiny_neox, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    (tmp / "exp.yaml").write_text(exp().replace(MODEL, str(tiny_neox)))
    out = CliRunner().invoke(app, ["run", str(tmp / "exp.yaml"), "-w", str(tmp / "ws")])
    assert out.exit_code == 0, out.output
    return tmp / "ws"


def test_there_are_at_least_30_cases_with_unique_names():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert len(BOMB) < 700


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_clear_message_exit_2_and_writes_nothing(case, tmp_path, tiny_neox, request, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default workspace would land here: it must not appear either
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content.replace(MODEL, str(tiny_neox)))
        else:
            path.write_bytes(content.replace(MODEL.encode(), str(tiny_neox).encode()))
    if case.setup:
        SETUPS[case.setup](tmp_path, tiny_neox)
    if case.existing_workspace:
        ws = request.getfixturevalue("finished_workspace")
        before = snapshot(ws)
    else:
        ws = tmp_path / "ws"
    args = [case.command]
    if case.command in ("run", "validate", "sweep"):
        args.append(str(tmp_path / "exp.yaml"))
    args += case.args
    if case.command != "validate":
        args += ["-w", str(ws)]
    before_files = sorted(p.name for p in tmp_path.iterdir())
    out = CliRunner().invoke(app, args)
    text = out.output
    assert out.exit_code == 2, text
    assert text.count("error:") == 1 and "Traceback" not in text, text
    assert len(text) < 4000, text[:4000]  # a hostile value is shown shortened, never a page of it
    for needle in case.needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    if case.existing_workspace:
        assert snapshot(ws) == before  # read, never written (not even a -wal file left behind)
    else:
        assert not ws.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == before_files  # no default workspace either
