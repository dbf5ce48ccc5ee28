"""The public API, its reference documentation, the examples in the docstrings, and lint: all checked here,
so the README's one test command (and CI) covers them."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import chisep

ROOT = Path(__file__).resolve().parents[1]


def _modules():
    for info in pkgutil.walk_packages(chisep.__path__, "chisep."):
        if info.name.startswith("chisep.models") or info.name == "chisep.__main__":
            continue
        yield info.name


def test_import_chisep_gives_the_documented_api():
    api = (ROOT / "docs" / "api.rst").read_text()
    missing_docs = []
    for name in chisep.__all__:
        value = getattr(chisep, name)  # every advertised name resolves
        if name.startswith("_") or isinstance(value, type(chisep)):
            continue
        qualname = f"{value.__module__}.{getattr(value, '__name__', name)}" if hasattr(value, "__module__") else name
        if not re.search(rf"\b{re.escape(getattr(value, '__name__', name))}\b", api):
            missing_docs.append(qualname)
    assert not missing_docs, f"public names absent from docs/api.rst: {missing_docs}"
    # quick: no numerical library is loaded by importing the package itself
    out = subprocess.run([sys.executable, "-c", "import chisep, sys; print('jax' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _documented_functions():
    """Every function ``import chisep`` offers and every function the API reference lists."""
    seen = {}
    for name in chisep.__all__:
        value = getattr(chisep, name)
        if inspect.isfunction(value):
            seen[f"{value.__module__}.{value.__name__}"] = value
    for qualname in re.findall(r"^\.\. autofunction:: (\S+)", (ROOT / "docs" / "api.rst").read_text(), re.M):
        module, name = qualname.rsplit(".", 1)
        seen[qualname] = getattr(importlib.import_module(module), name)
    for block in re.findall(r"^\.\. automodule:: (\S+)\n   :members: (.+)$", (ROOT / "docs" / "api.rst").read_text(), re.M):
        module = importlib.import_module(block[0])
        for name in (n.strip() for n in block[1].split(",")):
            value = getattr(module, name)
            if inspect.isfunction(value):
                seen[f"{block[0]}.{name}"] = value
    return seen


def test_every_public_function_documents_its_parameters():
    functions = _documented_functions()
    assert len(functions) >= 60
    undocumented = [name for name, f in functions.items()
                    if [p for p in inspect.signature(f).parameters if p != "self"]
                    and not all(section in (f.__doc__ or "") for section in ("Parameters", "Returns"))]
    assert not undocumented, f"functions of the API without Parameters and Returns: {undocumented}"


def test_docstring_examples_run():
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = 0
    for name in _modules():
        module = importlib.import_module(name)
        for test in finder.find(module, name, extraglobs={"np": __import__("numpy")}):
            examples += len(test.examples)
            runner.run(test, out=lambda text: None)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed; run python -m doctest on the module"
    assert examples >= 20, f"only {examples} docstring examples found"


@pytest.mark.slow
def test_api_reference_builds_without_warnings(tmp_path):
    # sphinx and numpydoc come with the test extra: a missing one is a failure, not a skip
    done = subprocess.run([sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html",
                           str(ROOT / "docs"), str(tmp_path / "html")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "html" / "api.html").read_text()
    for name in ("reconstruct_qsm", "qsm_from_field", "SeparationInputs", "ChiSeparation", "edge_mask"):
        assert name in page


def test_lint_finds_nothing():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is installed by the test extra (pip install '.[test]')")
    done = subprocess.run([ruff, "check", "chisep", "tests", "benchmarks", "scripts"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
