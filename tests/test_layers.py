"""The import contracts of pyproject.toml ([tool.importlinter]): cli above the API above the library
above runner above demo above workers above db. import-linter reads the installed layout (qrun.cli is
cli/, ...), so the checks run on a copy of the sources laid out as installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def installed_layout(into: Path) -> Path:
    """The package as pip installs it (pyproject's package-dir), copied under `into`."""
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in settings["package-dir"].items():
        target = into.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in (REPO / folder).glob("*.py"):
            shutil.copy2(source, target / source.name)
    return into


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "lint-imports"), "--config", str(REPO / "pyproject.toml"),
               "--no-cache"]
    return subprocess.run(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=300)


def test_every_layer_imports_only_the_layers_below_it(tmp_path):
    result = lint_imports(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_a_library_module_that_imports_the_cli_breaks_the_contract(tmp_path):
    root = installed_layout(tmp_path)
    api = root / "qrun" / "api.py"
    api.write_text(api.read_text() + "\nfrom qrun.cli import table  # noqa: E402\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "qrun.api is not allowed to import qrun.cli" in result.stdout


def test_a_worker_module_that_imports_the_demo_breaks_the_contract(tmp_path):
    root = installed_layout(tmp_path)
    metrics = root / "qrun" / "workers" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nfrom qrun.demo import dataset  # noqa: E402\n")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "qrun.workers.metrics -> qrun.demo.dataset" in result.stdout
