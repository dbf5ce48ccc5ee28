"""The README's quickstart runs as written, and its reference list covers every method."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from chisep import cli
from chisep.references import REFERENCES

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str, section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(rf"```{language}\n(.*?)```", text[start:end], flags=re.S)


@pytest.mark.slow
def test_python_quickstart_runs_as_written(tmp_path):
    (code,) = _blocks("python", "Python quickstart")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # last line: the grid, then the largest chi_para and chi_dia (ppm): the GP and the tracts make both plausible
    grid, para, dia = re.fullmatch(r"\((\d+, \d+, \d+)\) (\S+) (\S+)", done.stdout.strip().splitlines()[-1]).groups()
    assert grid == "65, 77, 63"
    assert 0.05 < float(para) < 2 and 0.05 < float(dia) < 2, done.stdout


@pytest.mark.slow
def test_command_line_quickstart_runs_as_written(tmp_path, monkeypatch):
    (code,) = _blocks("bash", "Python quickstart")
    commands = [line for line in code.splitlines() if line.strip()]
    assert len(commands) == 2 and all(c.startswith("chisep ") for c in commands)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert cli.main(shlex.split(command)[1:] + ["--quiet"]) == 0, command
    assert (tmp_path / "run-cli" / "sub-phantom_report.html").is_file()
    assert (tmp_path / "run-cli" / "provenance.json").is_file()


def test_every_reference_is_in_the_readme():
    text = README.read_text()
    for stage, methods in REFERENCES.items():
        for name, citation in methods.items():
            assert citation in text, f"README lacks the reference of {stage} {name}"
