"""Shared fixtures: a private QRUN_HOME and database per test, tiny models built once per session,
and one Ray instance for the whole session (ray.init costs seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "anti_fraud"


@pytest.fixture
def qrun_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "qrun-home"
    monkeypatch.setenv("QRUN_HOME", str(home))
    monkeypatch.delenv("QRUN_DB", raising=False)
    return home


@pytest.fixture
def db(qrun_home):
    from qrun.db.session import open_database

    database = open_database()
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    from qrun.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2",
                            hidden=128, intermediate=256, layers=2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from qrun.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama",
                            hidden=128, intermediate=256, layers=2)


@pytest.fixture(scope="session")
def deep_qwen2(tmp_path_factory) -> Path:
    """More layers, so a quantization runs long enough to be interrupted mid-way."""
    from qrun.demo.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "deep-qwen2", arch="qwen2",
                            hidden=256, intermediate=512, layers=24)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def run_qrun(*args: str, env: dict | None = None, timeout: float = 600, check: bool = False,
         **popen) -> subprocess.CompletedProcess:
    """Run the real `qrun` console script in a subprocess."""
    exe = Path(sys.executable).parent / "qrun"
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})}, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"qrun {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def wait_for(predicate, timeout: float, what: str):
    """Poll predicate until it returns something truthy; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def write_labeled(path: Path) -> Path:
    """Eight dialogs, the scam-like ones labeled fraud, with ids as the seed's data would have."""
    from qrun.demo.tiny import sample_texts

    lines = sample_texts()[:8]  # alternating: scam call, ordinary chat, ...
    with path.open("w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"id": f"d{i}", "input": line, "label": i % 2 == 0}, ensure_ascii=False) + "\n")
    return path
