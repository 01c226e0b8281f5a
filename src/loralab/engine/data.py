"""Examples for training and evaluation, and how they become token ids.

Three sources (see `DataSpec`): the built-in `stdlib-docstrings` set, a JSONL/CSV file, or a
Hugging Face dataset. Every source ends as the same `Dataset` of (id, instruction, output)
examples with a fingerprint, so runs can tell whether they saw the same data.

Tokenisation lives here too because training labels and evaluation prompts must agree token for
token: both go through `prompt_ids`, and the response ends with the token generation stops on.
"""

from __future__ import annotations

import csv
import functools
import importlib
import inspect
import io
import json
import random
import re
import warnings
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from loralab.errors import DataError, ModelError, Problem
from loralab.config.loading import not_a_file
from loralab.config.schema import DataSpec, config_hash

BUILTIN_NAME = "stdlib-docstrings"
# The builtin prompts are short; without a system message SmolLM's template injects its own
# ~20-token one, which would be most of a training example.
BUILTIN_SYSTEM_PROMPT = "You summarize Python functions in one sentence."
BUILTIN_REQUEST = "Summarize what this Python function does in one sentence."
IGNORE_INDEX = -100  # what torch's cross-entropy skips

# Plain prompt for tokenizers without a chat template (base models); Alpaca-style because it is
# what such models have most often seen.
PLAIN_SYSTEM = "{system}\n\n"
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"

_MAX_LISTED_PROBLEMS = 20  # a file broken on every line should not print thousands of lines
_MAX_LISTED_LINES = 10  # of the other rows with the same problem


class _NotJSON(ValueError):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON does not allow them."""


def _no_constant(name: str) -> Any:
    raise _NotJSON(name)


def _loads(text: str) -> Any:
    """json.loads, minus NaN and Infinity (which would train as the text "nan")."""
    return json.loads(text, parse_constant=_no_constant)


@dataclass(frozen=True)
class Example:
    id: str  # builtin: the qualified name; files: "name:line"; hf: "split:index"
    instruction: str
    output: str
    # Chat data: the turns before the last user message, (role, content); their assistant turns are
    # learned too. Raw text: `raw`, the text cut in two (a prompt to continue, and the rest) and
    # learned whole, every token.
    history: tuple[tuple[str, str], ...] = ()
    raw: bool = False
    group: str | None = None  # data.group_field's value: related items share it (cluster-robust intervals)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: list[Example]
    eval: list[Example]
    fingerprint: str
    system_prompt: str | None  # what encode/prompt functions must use


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX over the prompt
    prompt_len: int


# ---------------------------------------------------------------------------------------------
# Loading


def load_data(spec: DataSpec, base_dir: Path) -> Dataset:
    """Examples from the source the spec names, split and capped; raise DataError on bad input."""
    if spec.eval_path and not spec.path:
        source = "data.hf" if spec.hf else "data.builtin"
        raise DataError("data.eval_path is only used with data.path",
                        [Problem("data.eval_path", f"not used with {source}", spec.eval_path,
                                 "remove eval_path, or give the training file as data.path")])
    if spec.path:
        train_all = _read_file(_resolve(spec.path, base_dir, "data.path"), spec, "data.path")
        if spec.eval_path:
            train, eval_ = train_all, _read_file(_resolve(spec.eval_path, base_dir, "data.eval_path"), spec, "data.eval_path")
        else:
            train, eval_ = _split(train_all, spec, Path(spec.path).name)
        name = Path(spec.path).name
        system_prompt = spec.system_prompt
    elif spec.hf:
        train, eval_ = _load_hf(spec, base_dir)
        name = spec.hf
        system_prompt = spec.system_prompt
    else:
        train, eval_ = _split(builtin_stdlib_docstrings(), spec, BUILTIN_NAME)
        name = BUILTIN_NAME
        system_prompt = BUILTIN_SYSTEM_PROMPT if spec.system_prompt is None else spec.system_prompt
    # Caps come after the split so the eval set does not move when only train_size changes.
    train = train[: spec.train_size] if spec.train_size else train
    eval_ = eval_[: spec.eval_size] if spec.eval_size else eval_
    return Dataset(name, train, eval_, fingerprint(train, eval_, system_prompt), system_prompt)


def data_surprises(dataset: Dataset) -> list[str]:
    """Eval examples that are also training examples: the eval loss then measures memory, not generalisation."""
    seen = {(e.instruction, e.output) for e in dataset.train}
    both = sum((e.instruction, e.output) in seen for e in dataset.eval)
    if not both:
        return []
    if both == len(dataset.eval):
        return [f"every eval example ({both}) is also a training example (is data.eval_path the training file?): "
                "eval loss will measure memory, not generalisation"]
    return [f"{both} of {len(dataset.eval)} eval examples are also training examples: they flatter the eval loss"]


def _seen(e: Example) -> list:
    """What of an example the model sees (chat history and raw text only when there is one, so the
    fingerprints of instruction data stay what they were)."""
    return [e.id, e.instruction, e.output] + ([[list(t) for t in e.history]] if e.history else []) + (["raw"] if e.raw else [])


def fingerprint(train: list[Example], eval_: list[Example], system_prompt: str | None) -> str:
    """12 hex chars that change whenever anything the model sees changes."""
    return config_hash({
        "system_prompt": system_prompt,
        "train": [_seen(e) for e in train],
        "eval": [_seen(e) for e in eval_],
    })


def _split(examples: list[Example], spec: DataSpec, name: str) -> tuple[list[Example], list[Example]]:
    """Seeded shuffle, then the first round(n * eval_fraction) are eval.

    Both halves keep the shuffled order, so a cap takes a random sample rather than the start of
    a sorted file (the builtin list is alphabetical), and a smaller cap is a prefix of a larger.
    """
    if len(examples) < 2:
        raise DataError(f"{name}: too few examples to split into train and eval",
                        [Problem("data.eval_fraction", f"{name} has {len(examples)} example(s), the eval split would be empty",
                                 len(examples), "add examples, or give a separate eval set (data.eval_path / data.eval_split)")])
    order = list(range(len(examples)))
    random.Random(spec.seed).shuffle(order)
    # At least one on each side: an empty eval set would make every comparison meaningless.
    n_eval = min(max(1, round(len(examples) * spec.eval_fraction)), len(examples) - 1)
    shuffled = [examples[i] for i in order]
    return shuffled[n_eval:], shuffled[:n_eval]


def _resolve(p: str, base_dir: Path, key: str) -> Path:
    q = Path(p).expanduser()
    q = q if q.is_absolute() else Path(base_dir) / q
    why = not_a_file(q)
    if why is not None:
        raise DataError(f"{key}: {why}: {q}",
                        [Problem(key, why, p, f"give a JSONL or CSV file; relative paths are read from {base_dir}")])
    return q


_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def _read_file(path: Path, spec: DataSpec, key: str) -> list[Example]:
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path.name}: unknown file type '{path.suffix}'",
                        [Problem(key, "unknown file type", path.suffix or "(no suffix)",
                                 "use .jsonl (one JSON object per line) or .csv (a header row with the field names)")])
    text = _read_text(path)
    rows = _jsonl_rows(text, path.name) if kind == "jsonl" else _csv_rows(text, path.name)
    if not rows:
        what = "empty file" if not text else ("empty file: only a header row" if text.strip() and kind == "csv" else "empty file: only blank lines")
        raise DataError(f"{path.name}: the file has no examples",
                        [Problem(key, what, str(path), "add one example per line (JSONL) or per row (CSV)")])
    return _examples(rows, spec, path.name)


MAX_LINE_BYTES = 64 << 20  # no example needs a 64 MiB line; a file with one is not JSONL or CSV text


def _scan_lines(path: Path) -> None:
    """Refuse a file that is not line-based text before reading it whole: a binary or sparse file (NUL
    bytes) or a line longer than MAX_LINE_BYTES is found line by line in bounded memory, not after a
    multi-gigabyte read ends in "not valid JSON"."""
    with open(path, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if b"\0" in raw:
                raise DataError(f"{path.name}:{n}: holds NUL bytes, so it is not a text file",
                                [Problem(f"{path.name}:{n}", "NUL bytes: a binary, sparse or damaged file, not text",
                                         str(path), "give a UTF-8 JSONL or CSV file")])
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path.name}:{n}: a line longer than {MAX_LINE_BYTES >> 20} MiB",
                                [Problem(f"{path.name}:{n}", f"line longer than {MAX_LINE_BYTES >> 20} MiB", str(path),
                                         "write one example per line (JSONL), each well under that; a JSON array "
                                         "that large belongs on many lines")])


def _read_text(path: Path) -> str:
    _scan_lines(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: Excel writes a BOM in front of UTF-8 CSV files
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path.name}:{line}: not UTF-8 text",
                        [Problem(f"{path.name}:{line}", "not UTF-8 text", data[err.start:err.start + 8],
                                 "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")]) from None


# A row is (id, where-for-errors, mapping of fields).
_Row = tuple[str, str, dict]


def _jsonl_rows(text: str, name: str) -> list[_Row]:
    if text.lstrip().startswith("[") and _is_json_array(text):
        # A whole-file JSON array is a common stand-in for JSONL; accept it rather than reporting
        # "broken line 1". A broken array falls through and is reported line by line.
        return _json_array_rows(text, name)
    rows, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) carry nothing
        where = f"{name}:{n}"
        try:
            obj = _loads(line)
        except json.JSONDecodeError as err:
            problems.append(Problem(where, f"not valid JSON ({err.msg} at column {err.colno})", _clip(line),
                                    'write one JSON object per line, e.g. {"instruction": "...", "output": "..."}'))
            continue
        except RecursionError:
            problems.append(Problem(where, "nested too deeply to read", _clip(line), "write one flat JSON object per line"))
            continue
        except _NotJSON as err:
            problems.append(Problem(where, f"holds {err}, which JSON does not allow (it would train as the text "
                                    f"'{str(err).lower()}')", _clip(line), "write the value as a quoted text, or drop the row"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(where, "line is not a JSON object", _clip(line),
                                    'write one JSON object per line, e.g. {"instruction": "...", "output": "..."}'))
            continue
        rows.append((where, where, obj))
    _raise_if(problems, name)
    return rows


def _is_json_array(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except (json.JSONDecodeError, RecursionError):
        return False


def _json_array_rows(text: str, name: str) -> list[_Row]:
    try:
        items = _loads(text)
    except _NotJSON as err:
        raise DataError(f"{name}: holds {err}", [Problem(name, f"holds {err}, which JSON does not allow", str(err),
                                                         "write the value as a quoted text, or drop the item")]) from None
    rows, problems = [], []
    for i, obj in enumerate(items):
        where = f"{name}[{i}]"
        if isinstance(obj, dict):
            rows.append((where, where, obj))
        else:
            problems.append(Problem(where, "item is not a JSON object", _clip(json.dumps(obj)),
                                    'make every item an object, e.g. {"instruction": "...", "output": "..."}'))
    _raise_if(problems, name)
    return rows


def _csv_rows(text: str, name: str) -> list[_Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, problems = [], []
    try:
        for row in reader:
            # line_num is the record's last line: the same as its first unless a field spans lines.
            where = f"{name}:{reader.line_num}"
            if None in row:  # more cells than header columns
                problems.append(Problem(where, f"row has {len(row) - 1 + len(row[None])} cells but the header has {len(row) - 1}",
                                        row[None], "quote cells that contain commas"))
                continue
            # A short row fills the missing columns with None; drop them so they read as missing.
            rows.append((where, where, {k: v for k, v in row.items() if v is not None}))
    except csv.Error as err:
        where = f"{name}:{reader.line_num}"
        raise DataError(f"{where}: not valid CSV", [Problem(where, f"not valid CSV ({err})", None,
                                                            "check the quoting on that line", False)]) from None
    _raise_if(problems, name)
    return rows


def _examples(rows: Iterable[_Row], spec: DataSpec, name: str) -> list[Example]:
    """Map rows to examples, collecting every bad row so one run reports them all."""
    out, problems = [], []
    formats: dict[str, list[str]] = {}  # format -> where its rows are
    for ex_id, where, row in rows:
        group = _group(row, where, spec.group_field, problems)
        if spec.messages_field in row and spec.instruction_field not in row:
            formats.setdefault(f"chat rows ('{spec.messages_field}')", []).append(where)
            ex = _chat_example(ex_id, where, row[spec.messages_field], spec.messages_field, problems)
            if ex is not None:
                out.append(replace(ex, group=group))
            continue
        if spec.text_field in row and spec.instruction_field not in row and spec.output_field not in row:
            formats.setdefault(f"raw text rows ('{spec.text_field}')", []).append(where)
            ex = _text_example(ex_id, where, row[spec.text_field], spec.text_field, problems)
            if ex is not None:
                out.append(replace(ex, group=group))
            continue
        formats.setdefault(f"instruction rows ('{spec.instruction_field}', '{spec.output_field}')", []).append(where)
        fields = {}
        for role, field in (("instruction_field", spec.instruction_field), ("output_field", spec.output_field)):
            value = row.get(field)
            if field not in row:
                problems.append(Problem(where, f"row has no field '{field}'", sorted(row),
                                        f"add '{field}' to every row, or set data.{role} to one of the fields above "
                                        f"(or give chat rows a '{spec.messages_field}' list, or raw text as "
                                        f"'{spec.text_field}')"))
            elif not isinstance(value, (str, int, float)) or isinstance(value, bool) or not str(value).strip():
                problems.append(Problem(where, f"field '{field}' must be non-empty text", value,
                                        f"give '{field}' a text value on every row"))
            else:
                fields[role] = str(value)
        if len(fields) < 2:
            continue
        instruction = fields["instruction_field"]
        extra = row.get(spec.input_field) if spec.input_field else None
        if isinstance(extra, (str, int, float)) and not isinstance(extra, bool) and str(extra).strip():
            instruction = f"{instruction}\n\n{extra}"
        out.append(Example(ex_id, instruction, fields["output_field"], group=group))
    _raise_if(problems, name)
    _one_format(formats, name)
    return out


def _one_format(formats: dict[str, list[str]], name: str) -> None:
    """One data format per file: instruction rows are scored on their answer, chat rows on the last assistant
    turn (earlier ones learned), raw text on every token as a continuation. A file mixing them trained
    and averaged unlike losses into one eval loss, silently."""
    if len(formats) < 2:
        return

    def rows(where: list[str]) -> str:
        return ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")

    kinds = sorted(formats, key=lambda k: -len(formats[k]))
    problems = [Problem(name, f"{len(formats[k])} {k}: {rows(formats[k])}", None,
                        f"keep one format per file: put these rows in a file of their own, or write them as {kinds[0]}",
                        False) for k in kinds[1:]]
    raise DataError(f"{name}: rows of {len(formats)} data formats in one file ({', '.join(kinds)}); most are {kinds[0]} "
                    f"({len(formats[kinds[0]])})", problems)


def _group(row: dict, where: str, field: str | None, problems: list[Problem]) -> str | None:
    """The row's data.group_field value as text (None when no field is named)."""
    if field is None:
        return None
    value = row.get(field)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
        return str(value)
    problems.append(Problem(where, f"row has no group in field '{field}'", value if field in row else sorted(row),
                            f"give every row a '{field}' (text or a number), or set data.group_field to one of "
                            "the fields above, or remove it"))
    return None


ROLES = ("system", "user", "assistant")


def _chat_example(ex_id: str, where: str, messages: Any, field: str, problems: list[Problem]) -> Example | None:
    """A chat row: [{role, content}, ...], an optional system message first, then user and assistant
    in turn, ending with the assistant's answer (the one generated at evaluation)."""
    fix = (f"write '{field}' as a list of {{role, content}} (roles system, user, assistant), user and assistant in turn, "
           "ending with an assistant message")
    if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages):
        problems.append(Problem(where, f"'{field}' must be a list of at least a user and an assistant message", messages, fix))
        return None
    turns = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str) or not content.strip():
            problems.append(Problem(where, f"{field}[{i}]: a role among {', '.join(ROLES)} and non-empty text content",
                                    m, fix))
            return None
        turns.append((role, content))
    body = turns[1:] if turns[0][0] == "system" else turns
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or [r for r, _ in body] != expected[:len(body)] or body[-1][0] != "assistant":
        problems.append(Problem(where, f"'{field}' roles in this order: {', '.join(r for r, _ in turns)}",
                                [r for r, _ in turns], fix))
        return None
    return Example(ex_id, turns[-2][1], turns[-1][1], history=tuple(turns[:-2]))


def _text_example(ex_id: str, where: str, text: Any, field: str, problems: list[Problem]) -> Example | None:
    """Raw text: learned whole; evaluated as a continuation (its first half the prompt, the rest the
    reference), cut where a run of whitespace starts, nearest the middle: byte-level BPE tokenizers give
    a whitespace run one token with the newline before it ("\n" + indentation), so a cut inside a run
    tokenizes the seam unlike the whole text; before the run, prompt + continuation are the whole's tokens."""
    if not isinstance(text, str) or len(text.strip()) < 2:
        problems.append(Problem(where, f"field '{field}' must be text of at least two characters", text,
                                f"give '{field}' a text value on every row"))
        return None
    text = text.strip()
    middle = len(text) // 2
    spaces = [i for i, c in enumerate(text) if c.isspace() and not text[i - 1].isspace()]
    cut = min(spaces, key=lambda i: abs(i - middle)) if spaces else middle
    return Example(ex_id, text[:cut], text[cut:], raw=True)


def _raise_if(problems: list[Problem], name: str) -> None:
    """One DataError for every bad row: rows counted once however many problems each has, and rows with
    the same problem (message and fix) shown once, with the others' lines listed after it."""
    if not problems:
        return
    rows = len({p.where for p in problems})
    groups: dict[tuple[str, str], list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.message, p.fix), []).append(p)
    shown = []
    for same in groups.values():
        first, others = same[0], same[1:]
        if others:
            at = [p.where.removeprefix(f"{name}:") for p in others[:_MAX_LISTED_LINES]]
            lines = ("line " if len(others) == 1 else "lines ") if all(p.where.startswith(f"{name}:") for p in others) else ""
            more = ", …" if len(others) > _MAX_LISTED_LINES else ""
            like = f"(and {len(others)} more row{'s' if len(others) > 1 else ''} like it: {lines}{', '.join(at)}{more})"
            first = Problem(first.where, first.message, first.value, f"{first.fix} {like}".strip(), first.has_value)
        shown.append(first)
    if len(shown) > _MAX_LISTED_PROBLEMS:
        rest = len(shown) - _MAX_LISTED_PROBLEMS
        shown = shown[:_MAX_LISTED_PROBLEMS] + [Problem(name, f"... and {rest} more kind{'s' if rest > 1 else ''} of problem",
                                                        None, "", False)]
    raise DataError(f"{name}: {rows} bad row{'s' if rows > 1 else ''}", shown)


def _clip(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _load_hf(spec: DataSpec, base_dir: Path) -> tuple[list[Example], list[Example]]:
    """A `save_to_disk` folder (or a folder of data files) if one exists at that path, else the hub
    (or its local cache)."""
    import datasets  # slow to import; only this source needs it

    assert spec.hf is not None
    local = Path(spec.hf).expanduser()
    local = local if local.is_absolute() else Path(base_dir) / local
    try:
        if local.is_dir() and any((local / m).is_file() for m in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(local))
        elif local.is_dir():  # a folder of data files (jsonl, csv, parquet): the datasets builders
            ds = datasets.load_dataset(str(local), spec.hf_config)
        else:
            ds = datasets.load_dataset(spec.hf, spec.hf_config)
    except Exception as err:  # offline, not found, gated, broken folder: all a message for the user
        first = (str(err).strip().splitlines() or [""])[0]
        raise DataError(f"data.hf: cannot load dataset '{spec.hf}': {type(err).__name__}: {_clip(first, 200)}",
                        [Problem("data.hf", f"cannot load ({type(err).__name__})", spec.hf,
                                 "check the id, hf_config and that every split has rows, the network (HF_HUB_OFFLINE / "
                                 "HF_DATASETS_OFFLINE), or give a folder written by Dataset.save_to_disk")]) from None

    def rows(split_ds: Any, split: str) -> list[Example]:
        where = f"{spec.hf}[{split}]"
        missing = [f for f in (spec.instruction_field, spec.output_field) if f not in split_ds.column_names]
        if missing:
            raise DataError(f"{where}: no column {', '.join(repr(m) for m in missing)}",
                            [Problem(where, f"no column '{m}'", list(split_ds.column_names),
                                     f"set data.{'instruction_field' if m == spec.instruction_field else 'output_field'} to one of the columns above")
                             for m in missing])
        return _examples(((f"{split}:{i}", f"{where} row {i}", r) for i, r in enumerate(split_ds)), spec, where)

    def pick(split: str, key: str) -> Any:
        if not isinstance(ds, datasets.DatasetDict):
            return ds  # a single saved Dataset has no split names: it is the whole data
        if split not in ds:
            raise DataError(f"{spec.hf}: no split '{split}'",
                            [Problem(f"data.{key}", f"no split '{split}'", split, f"use one of: {', '.join(ds)}")])
        return ds[split]

    if spec.eval_split:
        if not isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{spec.hf}: a single Dataset has no splits",
                            [Problem("data.eval_split", "the dataset has no named splits", spec.eval_split,
                                     "remove eval_split to split by data.eval_fraction")])
        train = rows(pick(spec.split, "split"), spec.split)
        eval_ = rows(pick(spec.eval_split, "eval_split"), spec.eval_split)
        if not eval_:
            raise DataError(f"{spec.hf}[{spec.eval_split}]: the eval split is empty",
                            [Problem("data.eval_split", "empty eval split", spec.eval_split, "choose a split with rows")])
        if not train:
            raise DataError(f"{spec.hf}[{spec.split}]: the train split is empty",
                            [Problem("data.split", "empty split", spec.split, "choose a split with rows")])
        return train, eval_
    return _split(rows(pick(spec.split, "split"), spec.split), spec, spec.hf)


# ---------------------------------------------------------------------------------------------
# The built-in data set


# Fixed and sorted so the set depends only on the Python version. Chosen for well-known,
# user-facing functions; os.path rather than posixpath/ntpath (same functions, familiar name).
_STDLIB_MODULES = (
    "base64", "binascii", "bisect", "builtins", "calendar", "cmath", "codecs", "collections",
    "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "email.utils",
    "filecmp", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html", "inspect", "ipaddress", "itertools", "json", "keyword", "math", "mimetypes",
    "operator", "os", "os.path", "pathlib", "pickle", "platform", "pprint", "random", "re",
    "secrets", "shlex", "shutil", "statistics", "string", "struct", "subprocess", "sys",
    "tempfile", "textwrap", "threading", "time", "traceback", "unicodedata", "urllib.parse",
    "uuid", "warnings", "zlib",
)
_ACCELERATORS = {"os": ("posix", "nt")}  # where a module's functions say they come from
# Replaced at run time by libraries this tool imports (torch.package patches inspect.getfile);
# sys.*hook are excluded by name for the same reason (pytest, rich).
_PATCHED = frozenset({"inspect.getfile"})
_TYPES = (bytes, dict, float, frozenset, int, list, set, str, tuple)

_MIN_CHARS, _MAX_CHARS = 20, 120  # shorter says nothing; longer costs training tokens
_MAX_SIGNATURE_CHARS = 60  # `name(params)`: long keyword lists would dominate the prompt
# Sentences that point elsewhere or describe an operator instead of saying what the function does.
_REJECT_START = ("See ", "Deprecated", "DEPRECATED", "Alias", "Same as", "Like ", "Equivalent to",
                 "Obsolete", "Undocumented", "Internal", "Private", "For internal", "This function",
                 "Backwards", "Backward")
_REJECT_ANYWHERE = ("<==>", "->", "XXX", "TODO", "deprecated")
_ABBREVIATION = re.compile(r"\b(e\.g|i\.e|etc|vs|cf|approx)\.$")


def builtin_stdlib_docstrings() -> list[Example]:
    """All candidates, sorted by id; `load_data` splits and caps them."""
    return list(_builtin_cached())


@functools.lru_cache(maxsize=1)
def _builtin_cached() -> tuple[Example, ...]:
    found: dict[str, tuple[str, str]] = {}  # id -> (signature, summary)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # touching deprecated attributes must not print
        for mod_name in _STDLIB_MODULES:
            for name, obj in _module_functions(mod_name):
                prefix = "" if mod_name == "builtins" else f"{mod_name}."
                _add(found, f"{prefix}{name}", obj, drop_self=False)
        for tp in _TYPES:
            for name in sorted(vars(tp)):
                if not name.startswith("_"):
                    _add(found, f"{tp.__name__}.{name}", getattr(tp, name), drop_self=True)
    out, seen_outputs = [], set()
    for qual in sorted(found):
        sig, summary = found[qual]
        # The same sentence for two functions (aliases, bytes/bytearray twins) would let eval
        # answers leak into training; the first id in sorted order wins.
        if summary in seen_outputs:
            continue
        seen_outputs.add(summary)
        out.append(Example(qual, f"{BUILTIN_REQUEST}\n`{qual}{sig}`", summary))
    return tuple(out)


def _module_functions(mod_name: str) -> list[tuple[str, Any]]:
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:  # a platform without it (e.g. a minimal build): the set is just smaller
        return []
    public = getattr(mod, "__all__", None)
    # Only what the module (or its C accelerator: _heapq for heapq, posix for os) defines. This
    # also skips what other libraries patch in at run time (torch replaces inspect.getfile,
    # pytest sys.unraisablehook), which would make the set depend on what was imported first.
    own = {mod.__name__, mod_name, "_" + mod_name.rsplit(".", 1)[-1], *_ACCELERATORS.get(mod_name, ())}
    out = []
    for name in sorted(set(public) if public is not None else dir(mod)):
        obj = _unwrapped(getattr(mod, name, None), name, own)
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if name.endswith("hook") or f"{mod_name}.{name}" in _PATCHED:
            continue
        if getattr(obj, "__module__", None) not in own:
            continue
        out.append((name, obj))
    return out


def _unwrapped(obj: Any, name: str, own: set) -> Any:
    """The module's own function when a library wrapped it in a closure: Cython modules (Ray's, so
    every Ray actor) replace inspect.isgenerator with a wrapper holding the original, and the set must
    be the same in a process that imported them as in one that did not."""
    if getattr(obj, "__module__", None) in own:
        return obj
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if inspect.isfunction(inner) and inner.__name__ == name and inner.__module__ in own:
            return inner
    return obj


def _add(found: dict, qual: str, obj: Any, drop_self: bool) -> None:
    if not callable(obj) or not isinstance(getattr(obj, "__doc__", None), str):
        return
    sig = _signature(obj, drop_self)
    summary = first_sentence(obj.__doc__)
    if sig is None or summary is None or len(qual) + len(sig) > _MAX_SIGNATURE_CHARS:
        return
    found[qual] = (sig, summary)


def _signature(obj: Any, drop_self: bool) -> str | None:
    """`(a, b=1, *, key=None)` without annotations, private params or the `/` marker.

    A compact form: the prompt should name the inputs, not restate typing details; and a default
    whose repr is an object address would make the data set differ between processes.
    """
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (ValueError, TypeError):  # C functions without a text signature
        return None
    if drop_self and params and params[0].name == "self":
        params = params[1:]
    parts, star_done = [], False
    for p in params:
        if p.name.startswith("_"):
            continue
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star_done = True
            continue
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.default is p.empty:
            parts.append(p.name)
        else:
            r = repr(p.default)
            # Object reprs carry addresses; huge ints are sys.maxsize, which varies by platform.
            parts.append(f"{p.name}=…" if (" at 0x" in r or r.startswith("<") or len(r) > 12) else f"{p.name}={r}")
    return "(" + ", ".join(parts) + ")"


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence, cleaned; None when it is not a usable one-line summary."""
    para = re.split(r"\n\s*\n", inspect.cleandoc(doc).strip(), maxsplit=1)[0]
    para = " ".join(para.split())
    sentence = None
    for m in re.finditer(r"[.!?](?=\s|$)", para):
        head = para[: m.end()]
        if not _ABBREVIATION.search(head):
            sentence = head
            break
    if sentence is None:  # a paragraph without an end mark: the whole paragraph, if it is closed
        if para.endswith((":", ",", ";")):
            return None  # continues into a list or a code block
        sentence = para + "."
    if not (_MIN_CHARS <= len(sentence) <= _MAX_CHARS) or not sentence[0].isupper():
        return None
    if sentence.startswith(_REJECT_START) or any(s in sentence for s in _REJECT_ANYWHERE):
        return None
    return sentence


# ---------------------------------------------------------------------------------------------
# Tokenisation


def end_token_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn: what responses are trained to end with and what
    generation stops on. The chat template's own end-of-turn token when it has one (`<|im_end|>`
    for SmolLM, `<|eot_id|>` for Llama 3, which differ from eos in some models), else eos.

    Found once per tokenizer and chat template: encoding a data set asks for it per example."""
    key = (getattr(tokenizer, "chat_template", None), getattr(tokenizer, "eos_token_id", None))
    cached = _END_IDS.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    end = _find_end_token_id(tokenizer)
    _END_IDS[tokenizer] = (key, end)
    return end


_END_IDS: "weakref.WeakKeyDictionary[Any, tuple[tuple, int]]" = weakref.WeakKeyDictionary()


def _find_end_token_id(tokenizer: Any) -> int:
    template_end = _template_end_token(tokenizer)
    if template_end is not None:
        return template_end
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        raise ModelError("the tokenizer has no end-of-sequence token",
                         [Problem("model.tokenizer", "no eos_token and no end-of-turn token in a chat template", None,
                                  "use a model whose tokenizer defines eos_token (or set tokenizer.eos_token)", False)])
    return int(eos)


_MARK = "QzqXjwK"  # text no template adds on its own, to find where the assistant turn ends


def _template_end_token(tokenizer: Any) -> int | None:
    """Render a one-turn chat and read the first special token after the assistant's text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}], tokenize=False)
    except Exception:  # templates may reject a shape (strict role alternation): use eos
        return None
    if not isinstance(text, str) or _MARK not in text:
        return None
    tail = text[text.rindex(_MARK) + len(_MARK):].lstrip()
    ids = _as_ids(tokenizer(tail, add_special_tokens=False)) if tail else []
    if not ids:
        return None
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items() if getattr(t, "special", False)}
    return int(ids[0]) if ids[0] in special else None


def prompt_ids(tokenizer: Any, instruction: str, system_prompt: str | None) -> list[int]:
    """The tokens before the response, ending where the model starts writing.

    The chat template when the tokenizer has one; a system_prompt of None leaves the template's
    default, "" gives an empty system message (which suppresses that default).
    """
    if getattr(tokenizer, "chat_template", None):
        user = {"role": "user", "content": instruction}
        messages = [user] if system_prompt is None else [{"role": "system", "content": system_prompt}, user]
        try:
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:
            # Some templates (Gemma) refuse a system role; the usual remedy is to prepend it.
            if system_prompt is None or "system" not in str(err).lower():
                raise
            merged = {"role": "user", "content": f"{system_prompt}\n\n{instruction}" if system_prompt else instruction}
            out = tokenizer.apply_chat_template([merged], add_generation_prompt=True, tokenize=True)
        return _as_ids(out)
    text = (PLAIN_SYSTEM.format(system=system_prompt) if system_prompt else "") + PLAIN_PROMPT.format(instruction=instruction)
    return _as_ids(tokenizer(text))


def example_prompt_ids(tokenizer: Any, example: Example, system_prompt: str | None) -> list[int]:
    """Where generation starts for an example: after its chat history and last user message, or, for
    raw text, after the first half of the text (no template)."""
    if example.raw:
        return _as_ids(tokenizer(example.instruction))
    if not example.history:
        return prompt_ids(tokenizer, example.instruction, system_prompt)
    return _chat_ids(tokenizer, _messages(example, system_prompt), generation_prompt=True)


def _messages(example: Example, system_prompt: str | None) -> list[dict]:
    """An example's conversation up to its last user message (its own system message, else the data's)."""
    history = [{"role": r, "content": c} for r, c in example.history]
    if system_prompt is not None and not (history and history[0]["role"] == "system"):
        history.insert(0, {"role": "system", "content": system_prompt})
    return history + [{"role": "user", "content": example.instruction}]


def _chat_ids(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return _as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True))
    text = "".join((PLAIN_SYSTEM.format(system=m["content"]) if m["role"] == "system" else
                    PLAIN_PROMPT.format(instruction=m["content"]) if m["role"] == "user" else m["content"] + "\n\n")
                   for m in messages)
    return _as_ids(tokenizer(text))


def example_lengths(tokenizer: Any, dataset: Dataset) -> list[int]:
    """Tokens of prompt + answer + end token, per example of train then eval."""
    return [len(_as_ids(tokenizer(ex.instruction + ex.output))) + 1 if ex.raw else
            len(example_prompt_ids(tokenizer, ex, dataset.system_prompt))
            + len(_as_ids(tokenizer(ex.output, add_special_tokens=False))) + 1 for ex in dataset.train + dataset.eval]


def check_lengths(lengths: list[int], dataset: Dataset, limit: int, limit_where: str) -> None:
    """Raise DataError naming every example (file:line) whose prompt + answer + end token (`lengths`,
    from example_lengths) is longer than `limit` tokens: `encode_example` would cut its answer, so the
    run would learn not to stop."""
    long = [(ex, n) for ex, n in zip(dataset.train + dataset.eval, lengths) if n > limit]
    if not long:
        return
    need = max(n for _, n in long)
    fix = (f"raise {limit_where} to at least {need}, shorten or remove the example, "
           "or set data.truncate: true to cut such examples (their answers lose the end token)")
    problems = [Problem(ex.id, f"example is {n} tokens, longer than {limit_where} ({limit})", n, fix)
                for ex, n in long[:_MAX_LISTED_PROBLEMS]]
    if len(long) > len(problems):
        problems.append(Problem(dataset.name, f"... and {len(long) - len(problems)} more", None, "", False))
    raise DataError(f"{dataset.name}: {len(long)} example(s) longer than {limit_where} ({limit} tokens)", problems)


def encode_example(tokenizer: Any, example: Example, system_prompt: str | None, max_seq_len: int) -> Encoded:
    """Prompt + response + end token; only the response and the end token are learned.

    Over max_seq_len, the response is cut at the end and loses its end token (the model must not
    learn to stop mid-answer). If the prompt alone does not leave room, the prompt keeps its last
    tokens (the assistant header generation continues from) plus one response token, so every
    example still has something to learn.
    """
    if max_seq_len < 2:
        raise ValueError("max_seq_len must be at least 2")
    prompt = example_prompt_ids(tokenizer, example, system_prompt)
    learned = _history_labels(tokenizer, example, system_prompt, prompt)
    response = _as_ids(tokenizer(example.output, add_special_tokens=False)) + [end_token_id(tokenizer)]
    if example.raw:
        prompt, response = _raw_tokens(tokenizer, prompt, example)
        learned = [IGNORE_INDEX] + prompt[1:]
    if len(prompt) + len(response) > max_seq_len:
        if len(prompt) < max_seq_len:
            response = response[: max_seq_len - len(prompt)]
        else:
            cut = len(prompt) - (max_seq_len - 1)
            prompt, learned, response = prompt[cut:], learned[cut:], response[:1]
    return Encoded(prompt + response, learned + response, len(prompt))


def _raw_tokens(tokenizer: Any, prompt: list[int], example: Example) -> tuple[list[int], list[int]]:
    """Raw text as (prompt, rest + end token) in the whole text's own tokens: what the model learns is the
    text as a tokenizer reads it whole, whatever the cut does to the seam (a merge across it, a
    tokenizer that marks a word's start); the prompt is as much of the cut's prompt as the whole shares."""
    whole = _as_ids(tokenizer(example.instruction + example.output))
    k = 0
    while k < min(len(prompt), len(whole) - 1) and prompt[k] == whole[k]:
        k += 1
    return whole[:max(k, 1)], whole[max(k, 1):] + [end_token_id(tokenizer)]


def _history_labels(tokenizer: Any, example: Example, system_prompt: str | None, prompt: list[int]) -> list[int]:
    """Labels over the prompt: raw text learns all of it; a chat learns its earlier assistant turns
    (each up to its end-of-turn token); the rest is IGNORE. A template that does not render a
    conversation as the prefix of its continuation (rare) has only the last answer learned."""
    if example.raw:
        return [IGNORE_INDEX] + prompt[1:]  # the first token is predicted by nothing
    labels = [IGNORE_INDEX] * len(prompt)
    if not example.history or not getattr(tokenizer, "chat_template", None):
        return labels
    messages = _messages(example, system_prompt)
    end = end_token_id(tokenizer)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _chat_ids(tokenizer, messages[:i], generation_prompt=True)
        through = _chat_ids(tokenizer, messages[: i + 1], generation_prompt=False)
        if through[: len(before)] != before or prompt[: len(through)] != through:
            return [IGNORE_INDEX] * len(prompt)
        span = through[len(before):]
        span = span[: span.index(end) + 1] if end in span else span
        labels[len(before): len(before) + len(span)] = span
    return labels


def _as_ids(out: Any) -> list[int]:
    """A plain list of ints from what tokenizers return: a list, a BatchEncoding/dict, a tensor,
    or a batch of one (transformers 5 returns a BatchEncoding from apply_chat_template)."""
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):
        if len(out) != 1:
            raise ValueError(f"expected one sequence, got a batch of {len(out)}")
        out = list(out[0])
    return [int(i) for i in out]
