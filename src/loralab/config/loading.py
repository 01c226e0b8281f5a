"""Loading an experiment file: YAML read within bounds, every problem collected with its field path,
line, value and fix, then the sweep section checked (search_space) — all before anything is trained
or written.

The models themselves live in spec.py; this module sits above spec and search_space, so neither needs
the other's loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from loralab.errors import Problem, SpecError, shorten
from loralab.config.space import check_sweep
from loralab.config.schema import (_TOPICS, MAX_FILE_BYTES, MAX_YAML_NODES, RUN_NAME_RULE, Experiment, RunSpec, config_hash, deep_merge,
                   is_run_name)

_FIXES = {
    "extra_forbidden": "remove it or check its spelling; allowed here: {allowed}",
    "missing": "add this field",
    "float_parsing": "use a number such as 2e-4",
    "float_type": "use a number such as 2e-4",
    "int_parsing": "use a whole number such as 8",
    "int_type": "use a whole number such as 8",
    "int_from_float": "use a whole number such as 8",
    "greater_than": "use a value above {gt}",
    "greater_than_equal": "use a value of at least {ge}",
    "less_than": "use a value below {lt}",
    "less_than_equal": "use a value of at most {le}",
    "literal_error": "use one of {expected}",
    "bool_parsing": "use true or false",
    "dict_type": "write a mapping (key: value lines)",
    "list_type": "write a list, e.g. [a, b]",
    "too_short": "give at least one value",
    "string_type": "write text",
    "string_pattern_mismatch": "use 1 to 128 ASCII letters, digits, spaces, '_', '-', '.' or '+', starting with a letter or digit",
    "finite_number": "use a finite number (`.inf` and `.nan` cannot be trained with)",
    "model_type": "write a mapping of settings, e.g. `{{lora: {{r: 8}}}}`, or `{{}}` for the defaults",
    "too_long": "give at most {max_length}",
}


def _allowed_keys(model: type[BaseModel], loc: tuple) -> str:
    """The field names valid at the parent of `loc`, to suggest when a key is unknown."""
    cur: Any = model
    for part in loc[:-1]:
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return ""
        ann = fields[part].annotation
        cur = next((a for a in getattr(ann, "__args__", ()) if hasattr(a, "model_fields")), ann)
    names = getattr(cur, "model_fields", {})
    return ", ".join(f.alias or n for n, f in names.items() if not f.exclude)


def _problems(err: ValidationError, prefix: str, model: type[BaseModel], lines: dict) -> list[Problem]:
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(loc))
        if path.startswith("evaluation.sequential"):  # written as `repeats: auto` / `repeats: {min, max, metrics}`
            path = "repeats" + {"min_seeds": ".min", "max_seeds": ".max"}.get(path.rpartition(".")[2], path[len("evaluation.sequential"):])
        ctx = dict(e.get("ctx") or {})
        if e["type"] == "extra_forbidden":
            ctx["allowed"] = _allowed_keys(model, loc) or "see the docs"
        fix = _FIXES.get(e["type"], "").format(**{k: ctx.get(k, "") for k in ("gt", "ge", "lt", "le", "expected", "allowed",
                                                                               "max_length")}) if e["type"] in _FIXES else ""
        msg = {"extra_forbidden": "unknown key", "string_pattern_mismatch": "not a plain name (it names the study and the "
               "runs' group, and may name files: no '/', no leading '.')",
               "model_type": "not a mapping of settings"}.get(e["type"], e["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if "; fix: " in msg:  # a validator's own fix
            msg, fix = msg.split("; fix: ", 1)
        if e["type"] == "model_type" and path.startswith("sweep.space."):
            fix = "give a list of choices, e.g. [4, 8, 16], or a range such as {low: 1.0e-5, high: 1.0e-3, log: true}"
        elif e["type"] == "model_type" and _allowed_keys(model, loc + ("",)):
            fix = f"write a mapping of its settings ({_allowed_keys(model, loc + ('',))})"
        where = path or "(file)"
        if path in lines:
            where = f"{where} (line {lines[path]})"
        has_value = e["type"] not in ("missing",) and not (isinstance(e.get("input"), dict))
        out.append(Problem(where, msg, e.get("input"), fix, has_value))
    return out


def _line_index(text: str) -> dict[str, int]:
    """Map dotted key paths to their 1-based line in the YAML text, for error messages."""
    index: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return index

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = f"{path}.{k.value}" if path else str(k.value)
                index[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                index[f"{path}.{i}"] = v.start_mark.line + 1
                walk(v, f"{path}.{i}")

    if root is not None:
        walk(root, "")
    return index


def _duplicate_keys(text: str) -> list[Problem]:
    """Keys given twice in one mapping: YAML keeps the last silently, so a run declared twice would
    quietly replace the first."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    out = []

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in node.value:
                p = f"{path}.{k.value}" if path else str(k.value)
                line = k.start_mark.line + 1
                if k.value in first and k.value != "<<":
                    out.append(Problem(f"{p} (line {line})", f"duplicate key, first given on line {first[k.value]}",
                                       k.value, "give each key once (rename one of the runs, or merge the two entries)"))
                first.setdefault(k.value, line)
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, f"{path}.{i}")

    if root is not None:
        walk(root, "")
    return out


def parse_experiment(raw: Any, source: str | None = None, text: str | None = None) -> Experiment:
    """Validate a parsed YAML document; raise SpecError listing every problem."""
    where = source or "experiment"
    lines = _line_index(text) if text else {}
    if raw is None:  # an empty file (or comments only) would silently train every default on the built-in model
        raise SpecError(f"{where}: the file is empty",
                        [Problem("(file)", "no settings", None, "add at least `runs: {A: {}}` (see examples/ for a start)", False)])
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: the file must be a mapping of keys (model, data, defaults, runs, …)",
                        [Problem("(file)", "top level is not a mapping", type(raw).__name__, "start with keys such as `model:` and `runs:`")])
    problems: list[Problem] = _duplicate_keys(text) if text else []
    try:
        exp = Experiment.model_validate(raw)
    except ValidationError as err:
        problems.extend(_problems(err, "", Experiment, lines))
        exp = None

    runs_raw = raw.get("runs") if isinstance(raw.get("runs"), dict) else {}
    defaults_raw = raw.get("defaults") if isinstance(raw.get("defaults"), dict) else {}
    if "runs" in raw and not runs_raw:
        problems.append(Problem("runs" + (f" (line {lines['runs']})" if "runs" in lines else ""),
                                "no runs declared", raw.get("runs"), "add at least one named run, e.g. `runs: {A: {}}`"))
    resolved: list[RunSpec] = []
    seen_default_problems: set[str] = set()
    for name, override in (runs_raw or {}).items():
        name_s = str(name)
        if not is_run_name(name_s):
            label = name_s if name_s.isprintable() and len(name_s) <= 60 else shorten(name_s, 60)
            problems.append(Problem(f"runs.{label}", "invalid run name", name_s, RUN_NAME_RULE))
            continue
        override = override if isinstance(override, dict) else {}
        parts: dict[str, Any] = {}
        for topic, model in _TOPICS.items():
            d = defaults_raw.get(topic) if isinstance(defaults_raw.get(topic), dict) else {}
            o = override.get(topic) if isinstance(override.get(topic), dict) else {}
            merged = deep_merge(d, o)
            try:
                parts[topic] = model.model_validate(merged)
            except ValidationError as err:
                for p in _problems(err, "", model, {}):
                    key = p.where.split(" ")[0].split(".")[0]
                    from_run = key in o or (p.where == "(file)" and o)
                    prefix = f"runs.{name_s}.{topic}" if from_run else f"defaults.{topic}"
                    path = f"{prefix}.{p.where}" if p.where != "(file)" else prefix
                    if not from_run:
                        if path in seen_default_problems:
                            continue
                        seen_default_problems.add(path)
                    full = path + (f" (line {lines[path]})" if path in lines else "")
                    problems.append(Problem(full, p.message, p.value, p.fix, p.has_value))
        if len(parts) == len(_TOPICS):
            resolved.append(RunSpec(name=name_s, **parts))
    if isinstance(raw.get("sweep"), dict):

        problems.extend(check_sweep(raw, resolved, lines, Path(source).resolve().parent if source else None))
    if exp is not None:
        problems.extend(workspace_problems(exp, lines))
    if problems:
        n = len(problems)
        raise SpecError(f"{where}: {n} problem{'s' if n > 1 else ''} in the experiment file", problems)
    assert exp is not None
    if not resolved:  # no runs key: one run from the defaults
        resolved = [RunSpec(name="default", **{t: m.model_validate(defaults_raw.get(t) or {}) for t, m in _TOPICS.items()})]
    exp.resolved_runs = resolved
    exp.source = source
    return exp


def not_a_file(path: Path) -> str | None:
    """Why `path` cannot be read as a file ("file not found", "a folder, not a file", ...), or None when it can.

    A FIFO or a device is never opened: reading one could block for ever or never end."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as err:
        return f"cannot be read ({err.strerror or type(err).__name__})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a file"
    return "not a regular file"


def _yaml_bomb(root: Any) -> str | None:
    """Why a composed YAML document is unsafe to build: it contains itself through an alias, or its
    aliases expand to more than MAX_YAML_NODES nodes. Node by node, each node once: linear in the text."""
    def children(node: Any) -> list:
        if isinstance(node, yaml.MappingNode):
            return [x for kv in node.value for x in kv]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    size: dict[int, int] = {}
    open_: set[int] = set()  # entered, not finished: the path from the root to the current node
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_.discard(key)
            size[key] = min(1 + sum(size[id(c)] for c in children(node)), MAX_YAML_NODES + 1)
            continue
        if key in size:
            continue
        if key in open_:
            return "an alias refers to a structure that contains it (a recursive alias)"
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in size)
    if size[id(root)] > MAX_YAML_NODES:
        return f"its aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb)"
    return None


def load_experiment(path: str | Path) -> Experiment:
    """Read, parse and validate an experiment file."""
    p = Path(path)
    why = not_a_file(p)
    if why is not None:
        missing = why == "file not found"
        raise SpecError(f"{p}: " + ("no such experiment file" if missing else f"{why}, not an experiment file"),
                        [Problem(str(p), why, str(p), "check the path" if missing else "give the path of a YAML experiment file",
                                 False)])
    if p.stat().st_size > MAX_FILE_BYTES:
        raise SpecError(f"{p}: too large for an experiment file", [Problem(
            str(p), f"{p.stat().st_size:,} bytes, more than {MAX_FILE_BYTES:,}", str(p),
            "keep data in data files (data.path); the experiment file holds settings", False)])
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        where = f"{p}:{line}"
        raise SpecError(f"{where}: not UTF-8 text", [Problem(where, "not UTF-8 text", data[err.start:err.start + 8],
                                                            "save the file as UTF-8")]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        bomb = _yaml_bomb(root) if root is not None else None
        if bomb:
            raise SpecError(f"{p}: refusing to read the file: {bomb}",
                            [Problem(str(p), bomb, None, "write the values out, without aliases (&name / *name)", False)])
        raw = yaml.safe_load(text)
    except RecursionError:
        raise SpecError(f"{p}: nested too deeply to read",
                        [Problem(str(p), "lists or mappings nested hundreds of levels deep", None,
                                 "an experiment file nests a few levels: check the brackets", False)]) from None
    except ValueError as err:  # PyYAML's int() of a number with thousands of digits
        raise SpecError(f"{p}: a value cannot be read: {str(err).split(';')[0]}",
                        [Problem(str(p), "a number far too long to be a setting", None,
                                 "check the file for a pasted blob of digits", False)]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"{p}:{mark.line + 1}" if mark else str(p)
        raise SpecError(f"{line}: not valid YAML: {getattr(err, 'problem', err)}",
                        [Problem(line, "YAML syntax error", None, "check indentation and colons near that line", False)]) from None
    try:
        return parse_experiment(raw, str(p), text)
    except RecursionError:
        raise SpecError(f"{p}: nested too deeply to read",
                        [Problem(str(p), "lists or mappings nested too deep", None,
                                 "an experiment file nests a few levels: check the brackets", False)]) from None


def surprises(exp: Experiment) -> list[str]:
    """Settings that are valid but probably not what was meant: each worth one line, not an error."""
    out = []
    first: dict[str, str] = {}
    for run in exp.resolved_runs:
        same = config_hash([run.lora.model_dump(), run.train.model_dump(), run.generate.model_dump()])
        if same in first:
            out.append(f"runs {first[same]} and {run.name} have the same settings: {run.name} is {first[same]} again "
                       "(stored once, reported twice)")
        first.setdefault(same, run.name)
        if {"epochs", "max_steps"} <= run.train.model_fields_set:
            out.append(f"run {run.name}: train.epochs ({run.train.epochs:g}) and train.max_steps ({run.train.max_steps}) "
                       "are both set; max_steps decides, epochs is ignored")
    if "bootstrap_resamples" in exp.evaluation.model_fields_set:
        out.append("evaluation.bootstrap_resamples is ignored: intervals come from the variance over seeds and eval "
                   "examples, not from a bootstrap (docs/statistics.md); remove it")
    if "eval_fraction" in exp.data.model_fields_set and (exp.data.eval_path or exp.data.eval_split):
        out.append(f"data.eval_fraction ({exp.data.eval_fraction:g}) is ignored: the eval set is "
                   + ("data.eval_path" if exp.data.eval_path else "data.eval_split"))
    return out


def workspace_problems(exp: Experiment, lines: dict[str, int]) -> list[Problem]:
    """A database `workspace:` is checked with the file, not when `run` first opens it: a PostgreSQL URL
    with its driver installed, and the `artifacts:` folder its adapters go to (the file names it: every
    host reads the same file, and the folder must be the same path on each)."""
    ws = exp.workspace
    if not (isinstance(ws, str) and "://" in ws):
        return []
    from loralab.workspace.store import shown, url_problem  # SQLAlchemy: only for a database workspace

    at = lambda key: key + (f" (line {lines[key]})" if key in lines else "")  # noqa: E731
    bad = url_problem(ws)
    if bad is not None:
        return [Problem(at("workspace"), bad[0], shown(ws), bad[1])]
    if not exp.artifacts:
        return [Problem(at("workspace"), "a database workspace needs `artifacts:`, the folder its adapters go to",
                        shown(ws), "add `artifacts: /shared/loralab-artifacts` (a folder every host mounts at that path)")]
    why = artifacts_problem(Path(exp.artifacts).expanduser().resolve())
    if why is not None:
        return [Problem(at("artifacts"), why, exp.artifacts,
                        "give a folder every host can write (a shared disk mounted read-write at the same path)")]
    return []


def artifacts_problem(folder: Path) -> str | None:
    """Why adapters cannot be written under `folder` (what `run` would find only when it stores the first
    one), else None. Checked where it is or would be made: the folder, or its parent; a path none of which
    exists here (a mount of the cluster's hosts only) is left to the hosts."""
    import os

    where = folder if folder.exists() else folder.parent
    if not where.exists():
        return None
    if not where.is_dir():
        return f"{where} is a file, not a folder"
    try:
        read_only = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"{where} is on a read-only file system"
    if not os.access(where, os.W_OK | os.X_OK):
        return f"{where} is not writable by this user"
    import tempfile

    try:  # what the flags cannot tell (a pseudo file system, a server refusing writes): try, leaving nothing
        os.rmdir(tempfile.mkdtemp(prefix=".loralab-write-check-", dir=where))
    except OSError as err:
        return f"{where} refuses new folders ({err.strerror or type(err).__name__})"
    return None


def check_data_paths(exp: Experiment) -> list[Problem]:
    """Files the experiment names must exist: checked before anything is trained or written."""
    problems = []
    for key in ("path", "eval_path"):
        v = getattr(exp.data, key)
        why = not_a_file(exp.resolve_path(v)) if v else None
        if why is not None:
            problems.append(Problem(f"data.{key}", why, v,
                                    f"give a JSONL or CSV file; relative paths are read from {exp.base_dir}"))
    return problems
