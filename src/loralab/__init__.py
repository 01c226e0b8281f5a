"""loralab: declare LoRA runs in YAML, train them with PEFT, measure and compare the results."""

from .api import compare, difference, example_path, get_run, list_runs, load, run, validate
from .errors import LoralabError
from .spec import Experiment

__version__ = "0.1.0"
__all__ = ["difference", "load", "validate", "run", "list_runs", "get_run", "compare", "example_path", "Experiment", "LoralabError"]
