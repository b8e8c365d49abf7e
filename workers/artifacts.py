"""Where a job's output goes, and how it gets there whole or not at all.

A job writes into a hidden staging directory beside its final place and renames it into place
only after everything was written (rename is atomic on one file system). A crashed attempt
leaves only a staging directory, which the next attempt of the same job removes, or, where no
attempt is left, an idle worker (runner/worker.py).

What is published is the team's: directories 2775 (setgid, group-writable), files 0664, whatever mode
the library that wrote them chose (safetensors' writer makes 0600 files), so a teammate reads it and
`qrun prune` run by any of them removes it. Beside the weights lie the model card (README.md, rewritten
when an eval of the model finishes) and the manifest (qrun-artifact.json: how the model was made and
every other file's sha256, which `qrun export` checks).
"""

from __future__ import annotations

import hashlib
import json
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


SHARED_DIR_MODE = 0o2775  # setgid: what is made inside belongs to the directory's group
SHARED_FILE_MODE = 0o664


def share_with_group(root: Path) -> None:
    """Give `root` and everything in it the team's modes (README "Sharing a server")."""
    root.chmod(SHARED_DIR_MODE if root.is_dir() else SHARED_FILE_MODE)
    for path in root.rglob("*") if root.is_dir() else ():
        if not path.is_symlink():
            path.chmod(SHARED_DIR_MODE if path.is_dir() else SHARED_FILE_MODE)


def write_shared_text(path: Path, text: str) -> None:
    """Replace a text file whole (a temporary file beside it, renamed over it), with the team's mode:
    a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(SHARED_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(staging: Path, final: Path) -> Path:
    """Move a finished staging directory into its final place (replacing an earlier attempt's)."""
    check_safetensors_only(staging)
    share_with_group(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def directory_bytes(directory: Path) -> int:
    """An artifact's bytes on disk less its card's: the card is rewritten after each eval, the recorded
    size stays true."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.name != CARD)


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


def weights_bytes(directory: Path) -> int:
    """The bytes of the weights files (what weights_sha256 covers)."""
    return sum(p.stat().st_size for pattern in WEIGHT_PATTERNS for p in Path(directory).glob(pattern))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the card and the manifest

CARD = "README.md"  # the model card (Hugging Face's form), rewritten when an eval finishes
MANIFEST = "qrun-artifact.json"  # how the model was made, and every other file's sha256
UNLISTED = (CARD, MANIFEST)


def listed_files(directory: Path) -> list[str]:
    """The artifact's files the manifest lists (relative paths): all but the card and the manifest."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and str(p.relative_to(directory)) not in UNLISTED)


def file_digests(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of the files the manifest lists."""
    return {name: file_sha256(directory / name) for name in listed_files(directory)}


def write_manifest(directory: Path, facts: dict) -> dict:
    """The manifest: `facts` and the sha256 of every file written so far (call it last)."""
    manifest = facts | {"files": file_digests(directory)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def read_manifest(directory: Path) -> dict | None:
    """The manifest of an artifact, or None (an artifact from before manifests, or an unreadable one)."""
    try:
        return json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def copy_verified(source: Path, target: Path, names: list[str]) -> tuple[str, dict[str, str]]:
    """Copy the files `names` (relative paths) of `source` into `target`, hashing what is read as it is
    read; (the weights' digest as weights_sha256 computes it, {name: sha256} of every file)."""
    weights = hashlib.sha256()
    weight_names = {p.name for pattern in WEIGHT_PATTERNS for p in source.glob(pattern)}
    digests: dict[str, str] = {}
    for name in sorted(names):
        digest = hashlib.sha256()
        if name in weight_names:
            weights.update(name.encode())
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        with (source / name).open("rb") as src, (target / name).open("wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                if name in weight_names:
                    weights.update(block)
                dst.write(block)
        digests[name] = digest.hexdigest()
    return weights.hexdigest(), digests


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
