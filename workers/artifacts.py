"""Where a job's output goes, and how it gets there whole or not at all.

A job writes into a hidden staging directory beside its final place and renames it into place
only after everything was written (rename is atomic on one file system). A crashed attempt
leaves only a staging directory, which the next attempt of the same job removes, or, where no
attempt is left, an idle worker (runner/worker.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path

from qrun.db.errors import BadInput
from qrun.db.session import ensure_home

# qrun writes weights as safetensors only; anything pickled in an output is refused.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def safe_name(text: str) -> str:
    """A file-name fragment from user text: no separators, no dots at the start, no '..'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-")
    return cleaned[:80] or "model"


def inside(root: Path, name: str) -> Path:
    """root/name, refusing any name that would resolve outside root."""
    root = root.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise BadInput(f"artifact name {name!r} would leave the artifact directory {root}")
    return path


STAGING = ".staging-job"  # + job id + "-" + attempt (and "-offload") + "-" + pid


def staging_prefix(job_id: int) -> str:
    return f"{STAGING}{job_id}-"


def staging_dirs_by_job(root: Path) -> dict[int, list[Path]]:
    """The staging (and offload) directories under root, by the id of the job that made them."""
    found: dict[int, list[Path]] = {}
    for path in root.glob(STAGING + "*") if root.is_dir() else []:
        match = re.match(re.escape(STAGING) + r"(\d+)-", path.name)
        if match and path.is_dir():
            found.setdefault(int(match.group(1)), []).append(path)
    return found


def clear_stale_staging(root: Path, job_id: int) -> list[Path]:
    """Remove what earlier, crashed attempts of this job left behind."""
    stale = [p for p in root.glob(staging_prefix(job_id) + "*") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def new_staging_dir(root: Path, job_id: int, attempt: int) -> Path:
    path = inside(root, f"{staging_prefix(job_id)}{attempt}-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def check_safetensors_only(directory: Path) -> None:
    unsafe = [p.name for p in directory.rglob("*") if p.suffix in UNSAFE_SUFFIXES]
    if unsafe:
        raise RuntimeError(f"refusing to publish pickle files {unsafe}: qrun artifacts are safetensors only")


def publish(staging: Path, final: Path) -> Path:
    """Move a finished staging directory into its final place (replacing an earlier attempt's)."""
    check_safetensors_only(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


WEIGHT_PATTERNS = ("*.safetensors", "*.gguf")  # a GGUF artifact's weights are its llama.cpp file


def weights_sha256(directory: Path) -> str:
    """One digest over every weights file (safetensors, a GGUF artifact's .gguf), in name order (the
    weights, not the metadata)."""
    digest = hashlib.sha256()
    for path in sorted(p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern)):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the runner's mark in QRUN_HOME

RUNS = ".runs"  # one marker file per running `qrun run`, read back by its workers on every node


def runner_marker(home: Path, token: str) -> Path:
    return home / RUNS / token


@contextmanager
def runner_marked(home: Path):
    """A marker file that exists while this runner runs; its name (the token) goes to the workers,
    which refuse to start where they cannot read it (QRUN_HOME not shared with their node)."""
    token = uuid.uuid4().hex
    marker = runner_marker(home, token)
    ensure_home(marker.parent)  # group-writable: every teammate's runner marks itself here
    marker.write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
    try:
        yield token
    finally:
        marker.unlink(missing_ok=True)
