"""Security on a shared server: no code from a model runs unless asked, artifacts are safetensors
only, names cannot escape the artifact directory, every job names its real submitter, another
user's job is cancelled only with --force, and what qrun creates is shared with the group."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
from pathlib import Path

import pytest

from qrun.db import queue
from qrun.db.queue import JobSpec
from qrun.db.states import Kind
from helpers import drain_here, run_qrun

pytestmark = pytest.mark.reliability

ME = pwd.getpwuid(os.getuid()).pw_name


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- remote code


@pytest.fixture
def model_with_code(tmp_path, tiny_qwen2) -> tuple[Path, Path]:
    """A model whose config points at its own Python file, which would leave a marker if ever run."""
    model = tmp_path / "custom-model"
    shutil.copytree(tiny_qwen2, model)
    marker = tmp_path / "remote-code-ran"
    (model / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
                          "AutoConfig": "modeling_custom.CustomConfig"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def test_trust_remote_code_is_off_by_default(qrun_home, tiny_qwen2, model_with_code):
    from qrun.workers.params import QuantizeParams

    assert QuantizeParams(bits=4).trust_remote_code is False
    (job_id,) = json.loads(run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--json", check=True).stdout)
    (job,) = json.loads(run_qrun("status", "--json", str(job_id), check=True).stdout)
    assert job["params"]["trust_remote_code"] is False
    model, marker = model_with_code
    refused = run_qrun("submit", "--model", str(model), "--bits", "4")
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr


def test_worker_refuses_remote_code_that_slipped_into_the_table(db, model_with_code, restore_umask):
    """A job written by another tool (or an older qrun) is checked again by the worker: the model's
    code never runs."""
    model, marker = model_with_code
    (job_id,) = queue.submit_jobs(db, [JobSpec(kind=Kind.QUANTIZE, model=str(model),
                                               params={"bits": 4, "group_size": 32})])
    assert drain_here(db) == {job_id: "failed"}
    job = queue.get_job(db, job_id)
    assert "ships its own code" in job.error and "--trust-remote-code" in job.error
    assert job.attempts == 1  # bad input is not retried
    assert not marker.exists()


# ---------------------------------------------------------------- artifacts: format, names, permissions


@pytest.fixture
def group_home(qrun_home) -> Path:
    """QRUN_HOME made by an admin for a team: owned by group 'users' (gid 100), setgid."""
    qrun_home.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(qrun_home, -1, 100)
    qrun_home.chmod(0o2775)
    return qrun_home


def test_real_artifact_is_safetensors_only_and_shared_with_the_group(group_home, tiny_qwen2, restore_umask):
    from qrun.db.session import open_database

    database = open_database()
    try:
        (job_id,) = queue.submit_jobs(database, [JobSpec(kind=Kind.QUANTIZE, model=str(tiny_qwen2),
                                                         params={"bits": 4, "group_size": 32,
                                                                 "calib_samples": 8})])
        assert drain_here(database) == {job_id: "succeeded"}
        (artifact,) = queue.artifacts_of(database, [job_id])[job_id]
    finally:
        database.dispose()
    path = Path(artifact.path)
    assert path.parent == group_home / "artifacts"
    names = [p.name for p in path.iterdir()]
    assert "model.safetensors" in names or any(n.endswith(".safetensors") for n in names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle"))], names
    group = group_home.stat().st_gid
    made = [group_home / "qrun.db", group_home / "artifacts", group_home / "logs", path,
            *path.iterdir(), *(group_home / "logs").iterdir()]
    for item in made:
        assert item.stat().st_gid == group, item  # the setgid directory hands its group down
        if item.is_dir():
            assert mode(item) == 0o2775, (item, oct(mode(item)))
        else:
            assert mode(item) == 0o664, (item, oct(mode(item)))


def test_predictions_of_a_real_eval_are_shared_with_the_group(group_home, tiny_qwen2, tmp_path, restore_umask):
    """Predictions were written 0600 (tempfile.mkstemp): a teammate's `qrun compare` lost its agreement
    columns. Now 0664 under the workers' umask 002, group-owned, like every other file there."""
    from helpers import write_labeled
    from qrun.db.session import open_database

    data = write_labeled(tmp_path / "dialogs.jsonl")
    database = open_database()
    try:
        (job_id,) = queue.submit_jobs(database, [JobSpec(kind=Kind.EVAL, model=str(tiny_qwen2),
                                                         params={"data": str(data), "variant": "baseline"})])
        assert drain_here(database) == {job_id: "succeeded"}
        (artifact,) = queue.artifacts_of(database, [job_id])[job_id]
    finally:
        database.dispose()
    path = Path(artifact.path)
    assert artifact.kind == "predictions" and path.parent == group_home / "artifacts"
    assert (oct(mode(path)), path.stat().st_gid) == ("0o664", group_home.stat().st_gid)
    everything = [p for p in group_home.rglob("*") if p.is_file()]
    assert path in everything
    assert all(mode(p) & 0o040 for p in everything), {str(p): oct(mode(p)) for p in everything}


@pytest.mark.parametrize("umask, expected", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_predictions_honour_the_umask(tmp_path, umask, expected):
    """0666 less the umask, as for any file a process creates (mkstemp ignored it: always 0600)."""
    from qrun.workers.evaluate import write_predictions

    old = os.umask(umask)
    try:
        record = write_predictions([{"id": "a", "prediction": True}], tmp_path / "p.jsonl", job_id=7)
    finally:
        os.umask(old)
    assert mode(Path(record.path)) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]  # the temporary name was renamed away


def test_publish_refuses_pickle_files(tmp_path):
    from qrun.workers.artifacts import publish

    staging, final = tmp_path / ".staging-job1-1-1", tmp_path / "model-w4g128-job1"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"")
    (staging / "optimizer.pt").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"refusing to publish pickle files \['optimizer.pt'\]"):
        publish(staging, final)
    assert not final.exists()


HOSTILE = ["../../etc/cron.d/x", "/etc/passwd", "..", ".", "a/../../b", "..\\..\\x", "~root/.ssh", "\x00evil",
           "model\n../x", "-rf", "." * 300, "模型/../../x", ""]


@pytest.mark.parametrize("text", HOSTILE)
def test_names_from_user_text_stay_in_the_artifact_directory(tmp_path, text):
    from qrun.workers.artifacts import inside, safe_name

    root = tmp_path / "artifacts"
    root.mkdir()
    name = safe_name(text)
    assert "/" not in name and not name.startswith(".") and name
    assert inside(root, f"{name}-w4g128-job1").parent == root.resolve()


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/b", "a/../../b", ".."])
def test_a_path_that_leaves_the_artifact_directory_is_refused(tmp_path, name):
    from qrun.db.errors import BadInput
    from qrun.workers.artifacts import inside

    root = tmp_path / "artifacts"
    root.mkdir()
    with pytest.raises(BadInput, match="would leave the artifact directory"):
        inside(root, name)


def test_a_symlink_planted_in_the_artifact_directory_is_not_followed(tmp_path):
    from qrun.db.errors import BadInput
    from qrun.workers.artifacts import inside

    root, elsewhere = tmp_path / "artifacts", tmp_path / "someone-elses"
    root.mkdir()
    elsewhere.mkdir()
    (root / "model-w4g128-job7").symlink_to(elsewhere)
    with pytest.raises(BadInput, match="would leave the artifact directory"):
        inside(root, "model-w4g128-job7")


# ---------------------------------------------------------------- who did what


def test_every_job_records_its_real_submitter(qrun_home, tiny_qwen2):
    """$USER and $LOGNAME are the user's to set: the record comes from the process's uid."""
    out = run_qrun("submit", "--model", str(tiny_qwen2), "--bits", "4", "--json", check=True,
               env={"USER": "mallory", "LOGNAME": "mallory"})
    (job_id,) = json.loads(out.stdout)
    (job,) = json.loads(run_qrun("status", "--json", check=True).stdout)
    assert job["submitted_by"] == ME
    history = run_qrun("logs", str(job_id), check=True).stdout
    assert f"submit: - -> queued (by {ME})" in history


def test_cancelling_another_users_job_needs_force(db, qrun_home):
    (job_id,) = queue.submit_jobs(db, [JobSpec(kind=Kind.QUANTIZE, model="/models/m", params={"bits": 4})],
                                  user="alice")
    refused = run_qrun("cancel", str(job_id), env={"USER": "alice", "LOGNAME": "alice"})  # no way round it
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"Error: job {job_id} belongs to alice: add --force to cancel another user's job"
    assert queue.get_job(db, job_id).status == "queued"
    forced = run_qrun("cancel", "--force", str(job_id))
    assert forced.returncode == 0, forced.stderr
    job = queue.get_job(db, job_id)
    assert job.status == "cancelled" and job.error == f"cancelled by {ME}"
    assert queue.events_of(db, job_id)[-1].detail == f"by {ME}"


def test_database_files_are_group_writable_whatever_the_umask(qrun_home):
    """SQLite makes its -wal and -shm files as it needs them; each must stay writable by the group,
    even for a user whose umask is 077."""
    from qrun.db.session import artifacts_root, logs_root, open_database

    old = os.umask(0o077)
    try:
        database = open_database()
        queue.submit_jobs(database, [JobSpec(kind=Kind.QUANTIZE, model="/models/m", params={"bits": 4})])
        artifacts_root(), logs_root()
        files = [qrun_home / name for name in ("qrun.db", "qrun.db-wal", "qrun.db-shm")]
        assert all(f.exists() for f in files)  # the connection is still open: WAL files are there
        assert {f.name: oct(mode(f)) for f in files} == {f.name: "0o664" for f in files}
        for directory in (qrun_home, qrun_home / "artifacts", qrun_home / "logs"):
            assert mode(directory) == 0o2775, directory
        database.dispose()
    finally:
        os.umask(old)
