"""The package as a whole: every public name imports, and the structure checks in scripts/ pass
(no import circles between loralab's modules, no function over 80 lines)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

import loralab

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.parametrize("name", loralab.__all__)
def test_every_name_in_all_imports(name):
    value = getattr(loralab, name)  # a lazy name resolves to its module's object
    assert value is not None and getattr(value, "__name__", name) == name


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circles_among_loralab_modules(capsys):
    code = script("import_graph").main([])
    assert code == 0, capsys.readouterr().out  # names the circle


def test_no_function_is_longer_than_80_lines(capsys):
    code = script("long_functions").main([])
    assert code == 0, capsys.readouterr().out  # names each long function, longest first


def test_the_checks_see_a_circle_and_a_long_function_when_there_is_one():
    graph = script("import_graph")
    assert graph.circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert graph.circles({"a": {"b"}, "b": set()}) == []
    assert script("long_functions").functions(10_000) == []
    assert script("long_functions").functions(1)  # every function is over one line
