"""The Postgres test fixtures themselves: where no server can be had, the [postgres] cases skip with a
reason that says how to get one, and with CI set they fail, so a CI run never passes without them."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REAL_CONFTEST = Path(__file__).with_name("conftest.py")


def _run_without_postgres(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    """A small pytest session whose conftest is ours, except that no PostgreSQL programs are found."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(REAL_CONFTEST.parent)!r})  # its helpers
        import helpers
        helpers.postgres_bin_dir = lambda: None  # as on a machine without the postgresql package
        spec = importlib.util.spec_from_file_location("real_conftest", {str(REAL_CONFTEST)!r})
        real = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(real)
        globals().update({{k: v for k, v in vars(real).items() if not k.startswith("__")}})
    """))
    (tmp_path / "test_uses_any_db.py").write_text("def test_opens(any_db):\n    assert any_db.url\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "QRUN_TEST_POSTGRES_URL")}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


def test_without_postgres_the_cases_skip_saying_how_to_get_it(tmp_path):
    result = _run_without_postgres(tmp_path, ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 1 skipped" in result.stdout
    assert "PostgreSQL cases skipped: PostgreSQL's server programs (initdb, pg_ctl) are not installed" in result.stdout
    assert "apt-get install postgresql" in result.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_without_postgres_ci_fails(tmp_path, ci):
    result = _run_without_postgres(tmp_path, ci=ci)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed, 1 error" in result.stdout
    assert "PostgreSQL is required when CI is set" in result.stdout
