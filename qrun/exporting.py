"""`qrun export JOB DIR`: a quantize job's artifact copied out of QRUN_HOME, whole and checked, with its
model card.

Every file is hashed as it is read: the weights against the sha256 the job table recorded, every other
file against the artifact's manifest (workers.artifacts.MANIFEST). A file missing or changed, a job
without a model artifact, a target that exists and is not empty: one line (BadInput), and nothing at
the target. The copy goes into a hidden directory beside DIR and is renamed to DIR only once it is
complete and checked; the card in it is drawn again from the table, so it shows every eval so far.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qrun.db import queue
from qrun.db.errors import BadInput
from qrun.db.states import Kind
from qrun.workers import artifacts, card


def model_artifact(db, job_id: int):
    """The job and its recorded model artifact, or BadInput saying why there is none."""
    job = queue.get_job(db, job_id)
    record = next((a for a in queue.artifacts_of(db, [job_id])[job_id] if a.kind == "model"), None)
    if record is None:
        what = "an eval job: its output is predictions" if job.kind == Kind.EVAL.value else f"{job.status}"
        raise BadInput(f"job {job_id} has no model artifact to export ({what}): give a succeeded quantize job's id")
    source = Path(record.path)
    if not source.is_dir():
        raise BadInput(f"artifact {source} of job {job_id} is gone: retry job {job_id} to make it again")
    return job, record


def check_target(target: Path) -> Path:
    """DIR, absolute; BadInput where it exists and is not an empty directory, or its parent is missing."""
    target = target.expanduser().absolute()
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise BadInput(f"export target {target} exists and is not an empty directory: name a new directory")
    if not target.parent.is_dir():
        raise BadInput(f"export target {target}: its parent directory {target.parent} does not exist")
    return target


def expected_files(source: Path, job_id: int) -> dict[str, str | None]:
    """{file: sha256 it must have} for every file to copy (None: no digest recorded for it). The card is
    drawn again; a manifest lists every other file, and each of them must be there."""
    manifest = artifacts.read_manifest(source)
    present = artifacts.listed_files(source)
    if manifest is None:  # an artifact from before manifests: only the weights' digest in the table
        return {name: None for name in present}
    listed = manifest.get("files") or {}
    missing = sorted(set(listed) - set(present))
    if missing:
        raise BadInput(f"artifact {source} of job {job_id} lacks {missing[0]}, which it was written with: "
                       f"retry job {job_id} to make it again")
    return {name: listed.get(name) for name in present} | {artifacts.MANIFEST: None}


def check_copy(source: Path, job_id: int, record, expected: dict, weights: str, digests: dict) -> None:
    """BadInput naming the first file whose digest differs from the manifest's, or the weights where
    their digest differs from the one the job table recorded."""
    changed = sorted(name for name, digest in expected.items() if digest is not None and digests[name] != digest)
    if weights != record.sha256 and not changed:
        changed = [", ".join(sorted(p.name for pattern in artifacts.WEIGHT_PATTERNS for p in source.glob(pattern)))
                   or "its weights"]
    if changed:
        raise BadInput(f"artifact {source} of job {job_id} has changed since it was written: {changed[0]} differs "
                       f"from its recorded sha256; retry job {job_id} to make it again")


def export_artifact(db, job_id: int, target: Path) -> dict:
    """Copy job `job_id`'s model artifact to `target`, checked; what was copied: {job, source, target,
    files, bytes, sha256, card}."""
    job, record = model_artifact(db, job_id)
    target = check_target(Path(target))
    source = Path(record.path)
    expected = expected_files(source, job_id)
    staging = target.with_name(f".{target.name}.qrun-export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
    except OSError as exc:
        raise BadInput(f"export target {target} cannot be written ({exc.strerror}): name a directory you can "
                       "write") from exc
    try:
        weights, digests = artifacts.copy_verified(source, staging, list(expected))
        check_copy(source, job_id, record, expected, weights, digests)
        if not card.refresh_card(db, job, staging) and (source / artifacts.CARD).is_file():
            shutil.copyfile(source / artifacts.CARD, staging / artifacts.CARD)
        os.replace(staging, target)  # an empty directory at the target is replaced
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(p for p in target.rglob("*") if p.is_file())
    return {"job": job_id, "source": str(source), "target": str(target), "files": len(files),
            "bytes": sum(p.stat().st_size for p in files), "sha256": weights,
            "card": str(target / artifacts.CARD) if (target / artifacts.CARD).is_file() else None}
