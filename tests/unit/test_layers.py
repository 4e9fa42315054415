"""The package's layers (pyproject.toml's import-linter contract): no import runs up a layer."""

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--config", str(REPO / "pyproject.toml"), "--no-cache"]


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_up_a_layer_breaks_the_contract(tmp_path):
    """The contract is not vacuous: core importing the launcher fails it."""
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    errors = tmp_path / "pipelines" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom pipelines.launch import plan  # noqa: E402,F401\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "pipelines.core.errors -> pipelines.launch.plan" in result.stdout
