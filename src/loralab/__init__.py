"""loralab: declare LoRA runs in YAML, train them with PEFT, measure and compare the results.

The API names are imported on first use (PEP 562), so `loralab --help` does not load pydantic
and SQLAlchemy, and `import loralab` stays cheap.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import TYPE_CHECKING

# PEFT imports bitsandbytes when it is installed; on a CPU with AVX-512 BF16, bitsandbytes then asks the
# Hub (the `kernels` package) for an optional gemm_4bit kernel and logs, on every command, that it could
# not load it ("Failed to load CPU gemm_4bit_forward ..."; offline: "Skipping publisher trust check").
# It uses its own kernels instead, and QLoRA is unaffected. Set here, at the package root, so every path
# that imports PEFT (run, export, a Ray actor) is quiet; their errors still show.
for _noisy in ("bitsandbytes", "kernels"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
# PEFT calls a transformers API deprecated for v6 whenever it wraps or loads an adapter (a FutureWarning
# in every run log, and in export): not the user's to fix, and not ours.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

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
