"""loralab: declare LoRA runs in YAML, train them with PEFT, measure and compare the results.

The API names are imported on first use (PEP 562), so `loralab --help` does not load pydantic
and SQLAlchemy, and `import loralab` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
_API = ("compare", "difference", "example_path", "get_run", "list_runs", "load", "run", "validate")
_LAZY = {**{n: "api" for n in _API}, "Experiment": "config.schema", "LoralabError": "errors"}
__all__ = [*_API, "Experiment", "LoralabError"]

if TYPE_CHECKING:
    from loralab.api import compare, difference, example_path, get_run, list_runs, load, run, validate  # noqa: F401
    from loralab.errors import LoralabError  # noqa: F401
    from loralab.config.schema import Experiment  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loralab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
