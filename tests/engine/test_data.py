"""Data loading, the built-in data set and tokenisation, on a tiny tokenizer built in memory."""

from __future__ import annotations

import os

# Before anything imports datasets/transformers: these read the variable at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.engine.data import (
    BUILTIN_REQUEST,
    BUILTIN_SYSTEM_PROMPT,
    IGNORE_INDEX,
    Dataset,
    Encoded,
    Example,
    _as_ids,
    builtin_stdlib_docstrings,
    encode_example,
    end_token_id,
    first_sentence,
    load_data,
    prompt_ids,
)
from loralab.errors import DataError, ModelError
from loralab.config.schema import DataSpec

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Like Gemma: refuses a system message.
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _make_tokenizer(chat_template: str | None = CHATML, eos: str | None = "<|endoftext|>"):
    """Byte-level BPE trained on a few strings: encodes any text, builds in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([
        "Summarize what this Python function does in one sentence.",
        "Return the sum of the values. Join two paths.",
        "system user assistant ### Instruction: Response:",
    ], trainer)
    kwargs = {"pad_token": "<pad>"}
    if eos:
        kwargs["eos_token"] = eos
    if chat_template:
        kwargs["chat_template"] = chat_template
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


@pytest.fixture(scope="module")
def builtin():
    return builtin_stdlib_docstrings()


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _rows(n: int) -> list[dict]:
    return [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# The built-in data set


def test_builtin_is_deterministic_sorted_and_large(builtin):
    again = builtin_stdlib_docstrings()
    assert again == builtin and again is not builtin  # a copy: callers may not mutate the cache
    assert len(builtin) >= 300
    ids = [e.id for e in builtin]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # Deduplicated by answer: two prompts with one answer would leak eval into training.
    assert len({e.output for e in builtin}) == len(builtin)


@pytest.mark.parametrize("first", ["", "import torch, datasets;", "import ray;"])
def test_builtin_does_not_depend_on_what_was_imported(builtin, first):
    # The walk reads live module attributes, which libraries patch: torch replaces
    # inspect.getfile, pytest sys.unraisablehook, Ray's Cython inspect.isgenerator (and a Ray actor
    # imports Ray first). The fingerprint must not see that.
    code = (f"{first}import json; from loralab.engine.data import builtin_stdlib_docstrings as b;"
            "print(json.dumps([[e.id, e.instruction, e.output] for e in b()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [[e.id, e.instruction, e.output] for e in builtin]


def test_builtin_examples_have_the_documented_shape(builtin):
    by_id = {e.id: e for e in builtin}
    assert by_id["os.path.join"].instruction == f"{BUILTIN_REQUEST}\n`os.path.join(a, *p)`"
    # Methods of builtin types are shown without `self`; builtins without a module prefix.
    assert by_id["str.join"].instruction.endswith("\n`str.join(iterable)`")
    assert by_id["len"].instruction.endswith("\n`len(obj)`")
    for e in builtin:
        assert e.instruction.startswith(BUILTIN_REQUEST + "\n`") and e.instruction.endswith(")`")
        assert " at 0x" not in e.instruction  # object addresses would differ between processes
        assert "self" not in e.instruction.split("(", 1)[1]


def test_builtin_outputs_are_single_clean_sentences(builtin):
    for e in builtin:
        o = e.output
        assert 20 <= len(o) <= 120, o
        assert o.endswith(".") and o[0].isupper(), o
        assert "\n" not in o and "  " not in o, o
        # No second sentence: a sentence end followed by more text (abbreviations aside).
        assert not re.search(r"(?<!e\.g)(?<!i\.e)(?<!etc)[.!?]\s+\S", o), o
        assert not o.startswith(("See ", "Deprecated", "Same as")), o


@pytest.mark.parametrize("doc, expected", [
    ("Return the sum of two numbers.  Then more text.", "Return the sum of two numbers."),
    ("Join   two\n    paths together, e.g. a and b.\n\nDetails.", "Join two paths together, e.g. a and b."),
    ("Return a list of the words in the string", "Return a list of the words in the string."),
    ("Return a tuple of the form:\n\n  (a, b)", None),  # continues into a list
    ("See the documentation of foo() for details.", None),
    ("Too short.", None),
    ("lower-case start is a signature line (x) -> y.", None),
    ("Deprecated since 3.2; use something else instead.", None),
])
def test_first_sentence(doc, expected):
    assert first_sentence(doc) == expected


def test_builtin_split_is_disjoint_stable_and_sized(builtin):
    ds = load_data(DataSpec(), Path("."))
    assert ds.name == "stdlib-docstrings"
    train_ids, eval_ids = [e.id for e in ds.train], [e.id for e in ds.eval]
    assert not set(train_ids) & set(eval_ids)
    assert sorted(train_ids + eval_ids) == [e.id for e in builtin]  # nothing lost
    assert len(eval_ids) == round(len(builtin) * 0.1)
    assert ds == load_data(DataSpec(), Path("."))
    # A shuffled order, not alphabetical: a cap must sample all modules, not only `base64`.
    assert train_ids != sorted(train_ids)
    other_seed = load_data(DataSpec(seed=1), Path("."))
    assert [e.id for e in other_seed.eval] != eval_ids


def test_caps_take_prefixes_and_leave_eval_alone():
    full = load_data(DataSpec(), Path("."))
    capped = load_data(DataSpec(train_size=16, eval_size=8), Path("."))
    assert capped.train == full.train[:16] and capped.eval == full.eval[:8]
    only_train = load_data(DataSpec(train_size=16), Path("."))
    assert only_train.eval == full.eval
    assert only_train.fingerprint != full.fingerprint


def test_builtin_system_prompt_default_and_override():
    assert load_data(DataSpec(), Path(".")).system_prompt == BUILTIN_SYSTEM_PROMPT
    custom = load_data(DataSpec(system_prompt="Be brief."), Path("."))
    assert custom.system_prompt == "Be brief."
    assert custom.fingerprint != load_data(DataSpec(), Path(".")).fingerprint


# ---------------------------------------------------------------------------------------------
# User files


def test_fingerprint_follows_the_data(tmp_path):
    _jsonl(tmp_path / "d.jsonl", _rows(10))
    spec = DataSpec(path="d.jsonl")
    a = load_data(spec, tmp_path)
    assert re.fullmatch(r"[0-9a-f]{12}", a.fingerprint)
    assert load_data(spec, tmp_path).fingerprint == a.fingerprint
    rows = _rows(10)
    rows[3]["output"] = "a different answer"
    _jsonl(tmp_path / "d.jsonl", rows)
    assert load_data(spec, tmp_path).fingerprint != a.fingerprint


def test_jsonl_with_field_names_and_input(tmp_path):
    _write(tmp_path / "train.jsonl",
           '{"q": "Translate", "ctx": "bonjour", "a": "hello"}\n'
           "\n"  # blank lines are skipped but still counted for line numbers
           '{"q": "Add", "ctx": "", "a": "2"}\n'
           '{"q": "Sub", "a": 1}\n')
    _jsonl(tmp_path / "eval.jsonl", [{"q": "Mul", "ctx": "2 3", "a": "6"}])
    spec = DataSpec(path="train.jsonl", eval_path="eval.jsonl", instruction_field="q", input_field="ctx", output_field="a")
    ds = load_data(spec, tmp_path)
    assert ds.name == "train.jsonl" and ds.system_prompt is None
    assert ds.train == [
        Example("train.jsonl:1", "Translate\n\nbonjour", "hello"),
        Example("train.jsonl:3", "Add", "2"),  # empty input: not appended
        Example("train.jsonl:4", "Sub", "1"),  # numbers become text
    ]
    assert ds.eval == [Example("eval.jsonl:1", "Mul\n\n2 3", "6")]
    no_input = load_data(spec.model_copy(update={"input_field": None}), tmp_path)
    assert no_input.train[0].instruction == "Translate"


def test_relative_paths_are_read_from_base_dir(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    _jsonl(tmp_path / "exp" / "d.jsonl", _rows(5))
    monkeypatch.chdir(tmp_path)  # not the base dir
    assert len(load_data(DataSpec(path="d.jsonl"), tmp_path / "exp").train) == 4
    absolute = load_data(DataSpec(path=str(tmp_path / "exp" / "d.jsonl")), Path("/nonexistent"))
    assert len(absolute.train) == 4


def test_csv_with_quotes_multiline_and_input(tmp_path):
    _write(tmp_path / "d.csv",
           'prompt,context,answer\n'
           'Greet,,"Hello, world"\n'
           '"Two\nlines",extra,ok\n')
    ds = load_data(DataSpec(path="d.csv", eval_path="d.csv", instruction_field="prompt", input_field="context",
                            output_field="answer"), tmp_path)
    assert ds.train[0] == Example("d.csv:2", "Greet", "Hello, world")
    assert ds.train[1].instruction == "Two\nlines\n\nextra" and ds.train[1].output == "ok"


def test_split_from_file_is_seeded_and_exact(tmp_path):
    _jsonl(tmp_path / "d.jsonl", _rows(20))
    a = load_data(DataSpec(path="d.jsonl", eval_fraction=0.25), tmp_path)
    assert len(a.eval) == 5 and len(a.train) == 15
    assert {e.id for e in a.train} | {e.id for e in a.eval} == {f"d.jsonl:{i}" for i in range(1, 21)}
    assert a == load_data(DataSpec(path="d.jsonl", eval_fraction=0.25), tmp_path)
    assert a.eval != load_data(DataSpec(path="d.jsonl", eval_fraction=0.25, seed=7), tmp_path).eval
    capped = load_data(DataSpec(path="d.jsonl", eval_fraction=0.25, train_size=3, eval_size=2), tmp_path)
    assert capped.train == a.train[:3] and capped.eval == a.eval[:2]


def test_small_file_still_gets_one_eval_example(tmp_path):
    _jsonl(tmp_path / "d.jsonl", _rows(3))
    ds = load_data(DataSpec(path="d.jsonl", eval_fraction=0.01), tmp_path)
    assert len(ds.eval) == 1 and len(ds.train) == 2


def test_json_array_file_is_accepted(tmp_path):
    _write(tmp_path / "d.json", json.dumps(_rows(4)))
    ds = load_data(DataSpec(path="d.json", eval_path="d.json"), tmp_path)
    assert [e.id for e in ds.train] == ["d.json[0]", "d.json[1]", "d.json[2]", "d.json[3]"]


# ---------------------------------------------------------------------------------------------
# Errors a user can fix


def _data_error(spec: DataSpec, base: Path) -> DataError:
    with pytest.raises(DataError) as info:
        load_data(spec, base)
    assert info.value.problems, "every DataError names at least one problem"
    return info.value


def test_missing_file(tmp_path):
    err = _data_error(DataSpec(path="nope.jsonl"), tmp_path)
    p = err.problems[0]
    assert (p.where, p.value) == ("data.path", "nope.jsonl") and str(tmp_path) in p.fix
    err = _data_error(DataSpec(path=str(_jsonl(tmp_path / "d.jsonl", _rows(3))), eval_path="gone.csv"), tmp_path)
    assert err.problems[0].where == "data.eval_path"


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    _write(tmp_path / "d.jsonl", content)
    err = _data_error(DataSpec(path="d.jsonl"), tmp_path)
    assert err.problems[0].where == "data.path" and err.problems[0].message.startswith("empty file")
    _write(tmp_path / "d.csv", "instruction,output\n")  # a header and no rows
    assert _data_error(DataSpec(path="d.csv"), tmp_path).problems[0].message == "empty file: only a header row"


def test_broken_json_line_names_the_line(tmp_path):
    _write(tmp_path / "train.jsonl", json.dumps(_rows(1)[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    err = _data_error(DataSpec(path="train.jsonl"), tmp_path)
    assert [p.where for p in err.problems] == ["train.jsonl:3"]
    assert "not valid JSON" in err.problems[0].message
    assert "train.jsonl:3" in str(err)


def test_every_bad_line_is_reported(tmp_path):
    _write(tmp_path / "d.jsonl", "[1]\n{bad\n" + json.dumps(_rows(1)[0]) + "\n{\n")
    err = _data_error(DataSpec(path="d.jsonl"), tmp_path)
    # lines 2 and 4 have the same problem: shown once, with the other line named
    assert [p.where for p in err.problems] == ["d.jsonl:1", "d.jsonl:2"] and str(err).startswith("d.jsonl: 3 bad rows")
    assert "(and 1 more row like it: line 4)" in str(err.problems[1])


def test_row_missing_a_field_names_line_field_and_what_it_has(tmp_path):
    _write(tmp_path / "d.jsonl", json.dumps(_rows(1)[0]) + "\n" + '{"instruction": "q", "answer": "a"}\n')
    err = _data_error(DataSpec(path="d.jsonl"), tmp_path)
    (p,) = err.problems
    assert p.where == "d.jsonl:2" and "'output'" in p.message
    assert p.value == ["answer", "instruction"] and "data.output_field" in p.fix


def test_empty_output_value_is_an_error(tmp_path):
    _write(tmp_path / "d.jsonl", '{"instruction": "q", "output": "  "}\n{"instruction": null, "output": "a"}\n')
    err = _data_error(DataSpec(path="d.jsonl"), tmp_path)
    assert [p.where for p in err.problems] == ["d.jsonl:1", "d.jsonl:2"]


def test_csv_missing_column_and_extra_cells(tmp_path):
    _write(tmp_path / "d.csv", "instruction,answer\nq,a\n")
    p = _data_error(DataSpec(path="d.csv"), tmp_path).problems[0]
    assert p.where == "d.csv:2" and "'output'" in p.message and p.value == ["answer", "instruction"]
    _write(tmp_path / "e.csv", "instruction,output\nq,a\nq,a,b\n")
    assert _data_error(DataSpec(path="e.csv"), tmp_path).problems[0].where == "e.csv:3"


def test_non_utf8_file_names_the_line(tmp_path):
    _write(tmp_path / "d.jsonl", json.dumps(_rows(1)[0]).encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n')
    p = _data_error(DataSpec(path="d.jsonl"), tmp_path).problems[0]
    assert p.where == "d.jsonl:2" and "UTF-8" in p.message


def test_unknown_extension(tmp_path):
    _write(tmp_path / "d.txt", "hello\n")
    p = _data_error(DataSpec(path="d.txt"), tmp_path).problems[0]
    assert (p.where, p.value) == ("data.path", ".txt") and ".jsonl" in p.fix and ".csv" in p.fix


def test_too_few_rows_to_split(tmp_path):
    _jsonl(tmp_path / "d.jsonl", _rows(1))
    p = _data_error(DataSpec(path="d.jsonl"), tmp_path).problems[0]
    assert "eval split would be empty" in p.message and "eval_path" in p.fix


def test_eval_path_without_path():
    p = _data_error(DataSpec(eval_path="e.jsonl"), Path(".")).problems[0]
    assert p.where == "data.eval_path"


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def _save_dict(tmp_path: Path, splits: dict[str, list[dict]]) -> Path:
    import datasets

    folder = tmp_path / "hfds"
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    return folder


def test_hf_load_from_disk_with_splits(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "ctx" if i == 0 else "", "output": f"a{i}"} for i in range(6)]
    _save_dict(tmp_path, {"train": rows, "test": rows[:2]})
    ds = load_data(DataSpec(hf="hfds", eval_split="test"), tmp_path)
    assert ds.name == "hfds"
    assert ds.train[0] == Example("train:0", "q0\n\nctx", "a0") and len(ds.train) == 6
    assert [e.id for e in ds.eval] == ["test:0", "test:1"]


def test_hf_single_dataset_is_split_by_fraction(tmp_path):
    import datasets

    datasets.Dataset.from_list(_rows(10)).save_to_disk(str(tmp_path / "one"))
    ds = load_data(DataSpec(hf=str(tmp_path / "one"), eval_fraction=0.2), Path("/"))
    assert len(ds.train) == 8 and len(ds.eval) == 2


def test_hf_errors(tmp_path, monkeypatch):
    import datasets

    in_memory = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(_rows(4)),
        # datasets cannot load an empty split back from disk, so this one stays in memory.
        "validation": datasets.Dataset.from_dict({"instruction": [], "output": []}),
        "other": datasets.Dataset.from_list([{"question": "q", "answer": "a"}]),
    })
    _save_dict(tmp_path, {"train": _rows(1)})
    monkeypatch.setattr(datasets, "load_from_disk", lambda path: in_memory)
    p = _data_error(DataSpec(hf="hfds", split="dev"), tmp_path).problems[0]
    assert p.where == "data.split" and "train" in p.fix and "validation" in p.fix
    p = _data_error(DataSpec(hf="hfds", eval_split="validation"), tmp_path).problems[0]
    assert p.where == "data.eval_split" and "empty" in p.message
    p = _data_error(DataSpec(hf="hfds", split="other"), tmp_path).problems[0]
    assert "'instruction'" in p.message and p.value == ["question", "answer"]


def test_hf_offline_hub_id_is_a_data_error(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # Enforce offline even if another test module imported datasets before our env var was set.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    err = _data_error(DataSpec(hf="loralab-tests/no-such-dataset"), tmp_path)
    assert err.problems[0].where == "data.hf" and "loralab-tests/no-such-dataset" in str(err)


# ---------------------------------------------------------------------------------------------
# Tokenisation


def test_end_token_is_the_templates_end_of_turn(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != im_end  # the case where taking eos would be wrong
    assert end_token_id(tok) == im_end


def test_end_token_without_template_is_eos_and_must_exist():
    plain = _make_tokenizer(chat_template=None)
    assert end_token_id(plain) == plain.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(ModelError, match="end-of-sequence"):
        end_token_id(_make_tokenizer(chat_template=None, eos=None))


def test_prompt_ids_use_the_chat_template(tok):
    ids = prompt_ids(tok, "Join two paths.", "Be brief.")
    assert type(ids) is list and all(type(i) is int for i in ids)
    assert tok.decode(ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nJoin two paths.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(prompt_ids(tok, "Hi", None)) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_is_merged_when_the_template_refuses_it():
    tok = _make_tokenizer(chat_template=NO_SYSTEM)
    assert tok.decode(prompt_ids(tok, "Hi", "Be brief.")) == "<|im_start|>user\nBe brief.\n\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_plain_template_without_chat_template():
    plain = _make_tokenizer(chat_template=None)
    assert plain.decode(prompt_ids(plain, "Add 2 and 3.", None)) == "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    assert plain.decode(prompt_ids(plain, "Add.", "Be brief.")) == "Be brief.\n\n### Instruction:\nAdd.\n\n### Response:\n"
    enc = encode_example(plain, Example("x", "Add.", "5"), None, 512)
    assert enc.labels[-1] == plain.eos_token_id


def test_encode_masks_exactly_the_prompt(tok):
    ex = Example("x", "Join two paths.", "Return the sum of the values.")
    enc = encode_example(tok, ex, "Be brief.", 512)
    assert isinstance(enc, Encoded)
    prompt = prompt_ids(tok, ex.instruction, "Be brief.")
    assert enc.prompt_len == len(prompt) and enc.input_ids[: enc.prompt_len] == prompt
    assert enc.labels[: enc.prompt_len] == [IGNORE_INDEX] * len(prompt)
    assert enc.labels[enc.prompt_len:] == enc.input_ids[enc.prompt_len:]
    assert IGNORE_INDEX not in enc.labels[enc.prompt_len:]
    assert enc.labels[-1] == enc.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(enc.input_ids[enc.prompt_len:-1]) == ex.output
    assert len(enc.input_ids) == len(enc.labels)


def test_truncation_cuts_the_response_end(tok):
    ex = Example("x", "Join two paths.", "Return the sum of the values.")
    full = encode_example(tok, ex, None, 512)
    enc = encode_example(tok, ex, None, full.prompt_len + 3)
    assert len(enc.input_ids) == full.prompt_len + 3 == len(enc.labels)
    assert enc.prompt_len == full.prompt_len
    assert enc.input_ids == full.input_ids[: full.prompt_len + 3]
    assert enc.labels[-1] != end_token_id(tok)  # a cut answer must not teach the model to stop
    exact = encode_example(tok, ex, None, len(full.input_ids))
    assert exact == full


def test_truncation_of_a_prompt_longer_than_the_limit_keeps_its_end(tok):
    ex = Example("x", "Join two paths. " * 20, "Return the sum.")
    full = encode_example(tok, ex, None, 4096)
    enc = encode_example(tok, ex, None, 16)
    assert len(enc.input_ids) == 16 and enc.prompt_len == 15
    assert enc.input_ids[:15] == full.input_ids[full.prompt_len - 15: full.prompt_len]  # the assistant header survives
    assert enc.labels == [IGNORE_INDEX] * 15 + [full.input_ids[full.prompt_len]]  # one learned token


def test_as_ids_accepts_the_shapes_tokenizers_return():
    import torch

    assert _as_ids([1, 2]) == [1, 2]
    assert _as_ids({"input_ids": [[3, 4]]}) == [3, 4]
    assert _as_ids(torch.tensor([[5, 6]])) == [5, 6]
    with pytest.raises(ValueError):
        _as_ids([[1], [2]])


def test_dataset_is_frozen(builtin):
    ds = Dataset("n", builtin[:1], builtin[1:2], "0" * 12, None)
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]


def test_end_token_is_found_once_per_tokenizer_and_again_when_its_template_changes(monkeypatch):
    import loralab.engine.data as data_mod

    tok = _make_tokenizer()
    calls = []
    real = data_mod._template_end_token
    monkeypatch.setattr(data_mod, "_template_end_token", lambda t: calls.append(1) or real(t))
    ex = Example(id="x", instruction="Say hi.", output="Hi.")
    first = [encode_example(tok, ex, None, 64) for _ in range(3)]
    assert len(calls) == 1 and first[0] == first[2]
    tok.chat_template = None  # the plain fallback: the end token is eos now
    assert end_token_id(tok) == tok.eos_token_id and len(calls) == 2


# --- chat conversations and raw text ------------------------------------------------------------------


CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Join two paths."},
                     {"role": "assistant", "content": "Return the joined path."},
                     {"role": "user", "content": "Sum the values."},
                     {"role": "assistant", "content": "Return the sum."}]}


def _learned(tok, enc: Encoded) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def test_a_chat_row_learns_every_assistant_turn_and_only_those(tmp_path, tok):
    ds = load_data(DataSpec(path=str(_jsonl(tmp_path / "chat.jsonl", [CHAT] * 4)), eval_fraction=0.25), tmp_path)
    ex = ds.train[0]
    assert (ex.instruction, ex.output) == ("Sum the values.", "Return the sum.")
    assert ex.history == (("system", "Be brief."), ("user", "Join two paths."), ("assistant", "Return the joined path."))
    enc = encode_example(tok, ex, ds.system_prompt, 512)
    learned = _learned(tok, enc)
    assert "Return the joined path." in learned and "Return the sum." in learned
    assert "Join two paths" not in learned and "Sum the values" not in learned and "Be brief" not in learned
    # Generation starts after the last user message, the whole conversation before it.
    from loralab.engine.data import example_prompt_ids

    prompt = tok.decode(example_prompt_ids(tok, ex, ds.system_prompt))
    assert prompt.startswith("<|im_start|>system\nBe brief.") and prompt.endswith("Sum the values.<|im_end|>\n<|im_start|>assistant\n")
    assert enc.input_ids[: enc.prompt_len] == example_prompt_ids(tok, ex, ds.system_prompt)


@pytest.mark.parametrize("messages, needle", [
    ([{"role": "user", "content": "hi"}], "at least a user and an assistant message"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "roles in this order"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "non-empty text content"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "a role among system, user, assistant"),
    ("user: hi", "must be a list"),
])
def test_bad_chat_rows_are_named(tmp_path, messages, needle):
    with pytest.raises(DataError) as info:
        load_data(DataSpec(path=str(_jsonl(tmp_path / "bad.jsonl", [{"messages": messages}] * 3))), tmp_path)
    assert needle in " ".join(str(p) for p in info.value.problems)


def test_raw_text_is_learned_whole_and_evaluated_as_a_continuation(tmp_path, tok):
    rows = [{"text": f"Return the sum of the values number {i} and join two paths."} for i in range(5)]
    ds = load_data(DataSpec(path=str(_jsonl(tmp_path / "raw.jsonl", rows)), eval_fraction=0.2), tmp_path)
    ex = ds.eval[0]
    assert ex.raw and ex.instruction + ex.output == rows[int(ex.id.split(":")[1]) - 1]["text"]
    assert abs(len(ex.instruction) - len(ex.output)) < 12  # cut at the space nearest the middle
    enc = encode_example(tok, ex, ds.system_prompt, 512)
    assert enc.labels[0] == IGNORE_INDEX and enc.labels[1:] == enc.input_ids[1:]  # every token but the first
    assert "<|im_start|>" not in tok.decode(enc.input_ids)  # no chat template around raw text


@pytest.mark.parametrize("rows", [[CHAT] * 6, [{"text": f"Return the sum of the values number {i} and more."} for i in range(6)]])
def test_chat_and_raw_text_data_train_and_evaluate_end_to_end(tiny_llama, tmp_path, rows):
    import loralab

    data = _jsonl(tmp_path / "d.jsonl", rows)
    f = _write(tmp_path / "e.yaml", f"name: e\nmodel: {tiny_llama}\ndata: {{path: {data}, eval_fraction: 0.34}}\n"
               "evaluation: {drift: false}\nruns:\n  A: {lora: {r: 2, target_modules: [q_proj]}, "
               "train: {max_steps: 2}, generate: {max_new_tokens: 4}}\n")
    result = loralab.run(loralab.load(f), workspace=tmp_path / "ws")
    a = next(r for r in result.records if r.name == "A")
    assert a.status == "finished" and len(a.samples) == 2 and "rouge_l@4" in a.metrics


CODE = ["for i in range(10):\n        print(i * i)\n", "x = 1\n      \n    y = 2",
        "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n        return a - b\n",
        "Numbers:\n\n   1 2 3\n\t\t4 5 6\n      7 8 9 10 11 12"]


@pytest.fixture(scope="module")
def code_tok():
    """The tiny models' tokenizer: its BPE learned merges of newlines and indentation, as real ones do."""
    from tiny import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize("text", CODE)
def test_raw_text_cut_tokenizes_as_the_whole_text(tmp_path, code_tok, text):
    """Raw text (code: newlines and indentation) is cut into a prompt and its continuation: the prompt's
    tokens followed by the continuation's must be the whole text's tokens, both where generation starts
    (the cut) and in what is trained and scored (the encoded example). A cut inside a whitespace run
    tokenized "\\n" + spaces differently from the whole text."""
    tok = code_tok
    ds = load_data(DataSpec(path=str(_jsonl(tmp_path / "raw.jsonl", [{"text": text}] * 4)), eval_fraction=0.25), tmp_path)
    ex = ds.eval[0]
    whole = tok(text.strip())["input_ids"]
    assert ex.instruction + ex.output == text.strip()
    assert tok(ex.instruction)["input_ids"] + tok(ex.output, add_special_tokens=False)["input_ids"] == whole
    enc = encode_example(tok, ex, ds.system_prompt, 512)
    assert enc.input_ids[:-1] == whole and enc.input_ids[-1] == end_token_id(tok)
    assert enc.input_ids[:enc.prompt_len] == tok(ex.instruction)["input_ids"]  # generation starts at the cut


def test_raw_text_is_trained_on_the_whole_texts_tokens_whatever_the_cut(code_tok):
    """An example cut anywhere (an older workspace's cut, inside a word) still trains on the whole text's tokens."""
    tok = code_tok
    ex = Example("x", "def add(a, b):\n  ", "  return a + b", raw=True)
    whole = tok(ex.instruction + ex.output)["input_ids"]
    enc = encode_example(tok, ex, None, 512)
    assert enc.input_ids[:-1] == whole and enc.labels[1:] == enc.input_ids[1:]
    assert 1 <= enc.prompt_len <= len(tok(ex.instruction)["input_ids"])


def test_rows_of_several_formats_in_one_file_are_refused_with_their_rows(tmp_path):
    """Instruction, chat and raw-text rows are trained and scored differently; a file mixing them was read
    silently and its eval loss averaged unlike things. Refused, each minority format with its rows."""
    rows = _rows(6) + [CHAT, {"text": "Return the sum of the values and more."}, CHAT]
    with pytest.raises(DataError) as info:
        load_data(DataSpec(path=str(_jsonl(tmp_path / "mixed.jsonl", rows))), tmp_path)
    text = str(info.value) + " | " + " | ".join(str(p) for p in info.value.problems)
    assert "rows of 3 data formats" in text and "most are instruction rows" in text
    assert "2 chat rows ('messages'): mixed.jsonl:7, mixed.jsonl:9" in text
    assert "1 raw text rows ('text'): mixed.jsonl:8" in text and "keep one format per file" in text
    two = _rows(4) + [{"text": "Return the sum of the values and more."}]
    with pytest.raises(DataError, match="rows of 2 data formats"):
        load_data(DataSpec(path=str(_jsonl(tmp_path / "two.jsonl", two))), tmp_path)


def test_a_mixed_file_is_refused_by_validate_with_exit_2(tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from loralab.cli import app

    _jsonl(tmp_path / "mixed.jsonl", _rows(6) + [CHAT])
    f = _write(tmp_path / "m.yaml", f"name: m\nmodel: {tiny_llama}\ndata: {{path: mixed.jsonl}}\nruns:\n  A: {{}}\n")
    out = CliRunner().invoke(app, ["validate", str(f)])
    assert out.exit_code == 2 and "mixed.jsonl:7" in out.output and "keep one format per file" in out.output, out.output


def test_a_huge_file_that_is_not_text_is_refused_in_bounded_memory(tmp_path, monkeypatch):
    """A sparse file (all NUL bytes) or one endless line is refused after reading at most one line's
    limit, not read whole first (a 2 GB sparse file once cost 4.2 GB before "not valid JSON")."""
    import tracemalloc

    from loralab.engine import data as data_mod

    monkeypatch.setattr(data_mod, "MAX_LINE_BYTES", 1 << 20)
    sparse = tmp_path / "sparse.jsonl"
    with open(sparse, "wb") as f:
        f.write(b'{"instruction": "a", "output": "b"}\n')
        f.truncate(64 << 20)  # 64 MiB, nearly all a hole of NUL bytes
    endless = tmp_path / "endless.jsonl"
    endless.write_bytes(b'{"instruction": "a", "output": "b"}\n' + b"x" * (3 << 20))
    for path, line, what in ((sparse, 2, "NUL bytes"), (endless, 2, "line longer than 1 MiB")):
        tracemalloc.start()
        try:
            with pytest.raises(DataError) as err:
                load_data(DataSpec(path=path.name), tmp_path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert err.value.problems[0].where == f"{path.name}:{line}" and what in err.value.problems[0].message
        assert peak < 8 << 20, f"{peak} bytes held to refuse {path.name}"  # the whole file would be 64 MiB
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(20)))
    assert len(load_data(DataSpec(path="ok.jsonl"), tmp_path).train) > 0
