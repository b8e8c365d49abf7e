"""A shared table loses nothing to a teammate: job ids are never reused, another user's jobs are pruned
only with --force by an admin, admins are a list kept in the table, every such act is in the audit
log, and commands that only look never create a table. On real SQLite files, the real Postgres server
(`any_db`) and, where permissions matter, real Unix users made for the test."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, update

import qrun
from helpers import QRUN, invoke_main, run_qrun
from qrun.db import admins, queue
from qrun.db.errors import BadInput, TransitionError
from qrun.db.queue import JobSpec
from qrun.db.schema import AuditEntry, Job
from qrun.db.states import Kind

pytestmark = pytest.mark.reliability


def _specs(n: int) -> list[JobSpec]:
    return [JobSpec(kind=Kind.QUANTIZE, model="/models/m", params={"bits": 4, "n": i}) for i in range(n)]


def _finished(db, n: int, user: str) -> list[int]:
    """n jobs of `user`, cancelled (finished) an hour ago."""
    ids = queue.submit_jobs(db, _specs(n), user=user)
    queue.cancel_jobs(db, ids, user=user)
    with db.transaction() as s:
        s.execute(update(Job).where(Job.id.in_(ids)).values(finished_at=queue.utcnow() - timedelta(hours=1)))
    return ids


def _refused(result, *parts: str) -> str:
    """The one `Error:` line of a bad-input refusal (exit 2), holding every part."""
    output = getattr(result, "output", None) or (result.stdout + result.stderr)
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (code, output)
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


# ---------------------------------------------------------------- job ids


def test_job_ids_are_never_reused_after_the_newest_are_pruned(any_db):
    first = _finished(any_db, 3, "alice")
    assert queue.delete_finished_jobs(any_db, first[1:]) == first[1:]  # the two newest go
    (new,) = queue.submit_jobs(any_db, _specs(1), user="alice")
    assert new > first[-1]  # SQLite without AUTOINCREMENT gave the pruned id again


# ---------------------------------------------------------------- prune needs --force; the audit log


def test_pruning_another_users_jobs_needs_force_and_every_prune_is_audited(any_db):
    me = queue.current_user()
    theirs = _finished(any_db, 2, "alice")
    mine = _finished(any_db, 1, me)
    with pytest.raises(TransitionError, match=f"job {theirs[0]} belongs to alice: add --force to prune another "
                                              "user's job"):
        qrun.prune("1m", yes=True, db=any_db)
    assert len(queue.list_jobs(any_db)) == 3  # nothing removed
    assert qrun.prune("1m", user=me, yes=True, db=any_db)["jobs"][0]["id"] == mine[0]  # one's own: no force
    dry = qrun.prune("1m", db=any_db)
    assert (dry["removed"], dry["others"]) == (False, 2)
    assert [j["id"] for j in qrun.prune("1m", yes=True, force=True, db=any_db)["jobs"]] == theirs
    assert [(e["user"], e["action"], e["target"], e["detail"]) for e in qrun.audit(db=any_db)] == [
        (me, "prune", f"jobs {mine[0]}", f"of {me} (1)"),
        (me, "prune", f"jobs {theirs[0]}-{theirs[1]}", "of alice (2), --force")]


def test_the_audit_log_records_acts_on_others_work_and_outlives_prune(any_db):
    (bobs,) = queue.submit_jobs(any_db, _specs(1), user="bob")
    (alices,) = queue.submit_jobs(any_db, _specs(1), user="alice")
    queue.cancel_jobs(any_db, [alices], user="alice")  # one's own job: not recorded
    queue.retry_jobs(any_db, [alices], user="alice")
    queue.cancel_jobs(any_db, [bobs], user="alice", force=True)
    queue.retry_jobs(any_db, [bobs], user="alice", force=True)
    queue.cancel_jobs(any_db, [alices], user="alice", force=True)  # a forced act is recorded, whoever's job
    queue.set_priority_cap(any_db, "bob", 3, actor="root")
    queue.set_priority_cap(any_db, "bob", None, actor="root")
    admins.add_admin(any_db, "carol", by="root")
    admins.remove_admin(any_db, "carol", by="root")
    queue.cancel_jobs(any_db, [bobs], user="bob")
    queue.delete_finished_jobs(any_db, [bobs, alices], actor="root")
    entries = [(e["user"], e["action"], e["target"], e["detail"]) for e in qrun.audit(db=any_db)]
    assert entries == [
        ("alice", "cancel", f"job {bobs}", "of bob, --force"), ("alice", "retry", f"job {bobs}", "of bob, --force"),
        ("alice", "cancel", f"job {alices}", "of alice, --force"),
        ("root", "cap-priority", "user bob", "cap 3"), ("root", "cap-priority", "user bob", "cap removed"),
        ("root", "admin add", "user carol", None), ("root", "admin remove", "user carol", None),
        ("root", "prune", f"jobs {bobs}-{alices}", "of alice (1), bob (1)")]
    assert queue.list_jobs(any_db) == []  # the jobs are gone; what was done to them is not
    with any_db.transaction() as s:  # --since: the first entry made two days old
        s.execute(update(AuditEntry).where(AuditEntry.id == 1).values(at=queue.utcnow() - timedelta(days=2)))
    assert len(qrun.audit(since="1d", db=any_db)) == len(entries) - 1
    with pytest.raises(BadInput, match="--since 'soon'"):
        qrun.audit(since="soon", db=any_db)


def test_audit_on_the_command_line(db):
    queue.set_priority_cap(db, "bob", 2, actor="root")
    listed = invoke_main("audit", "--json")
    assert listed.exit_code == 0, listed.output
    (entry,) = json.loads(listed.stdout)
    assert {k: entry[k] for k in ("id", "user", "action", "target", "detail")} == {
        "id": 1, "user": "root", "action": "cap-priority", "target": "user bob", "detail": "cap 2"}
    table = invoke_main("audit")
    assert table.stdout.splitlines()[0].split() == ["AT", "USER", "ACTION", "TARGET", "DETAIL"]
    assert "cap-priority" in table.stdout.splitlines()[1]


# ---------------------------------------------------------------- admins, with real Unix users


@pytest.fixture
def unix_user():
    """A real login name of this machine, removed after the test."""
    name = f"qrun-test-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def _as(user: str, *args: str, home: Path) -> subprocess.CompletedProcess:
    """The real console script run as `user` (its uid and group), who may read root's Python (kept
    under /root, mode 0700) but not write anything a user of that name could not."""
    entry = pwd.getpwnam(user)
    prefix = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
              "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]
    return subprocess.run([*prefix, QRUN, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QRUN_HOME": str(home), "HOME": str(home)})


def _writable_by_all(home: Path) -> None:
    home.chmod(0o777)
    for path in home.glob("qrun.db*"):
        path.chmod(0o666)


def test_admins_are_a_list_in_the_table_that_only_admins_change(db, qrun_home, unix_user):
    (old,) = _finished(db, 1, "root")
    assert invoke_main("admin", "list").stdout.split() == ["root"]  # the table's owner and root, here one
    db.dispose()
    _writable_by_all(qrun_home)  # (root's own commands make QRUN_HOME 2775 again: only the user's come next)
    # Not an admin: refused, one line each, nothing changed.
    _refused(_as(unix_user, "cap-priority", unix_user, "3", home=qrun_home),
             f"only qrun's admins (root) may set priority caps, and {unix_user} is not one")
    _refused(_as(unix_user, "prune", "--older-than", "1m", "--yes", "--force", home=qrun_home),
             "may prune another user's jobs")
    assert [j.id for j in queue.list_jobs(db)] == [old] and queue.priority_caps(db) == {}
    # An admin makes them one; then they may do what admins do, the last admin excepted.
    added = invoke_main("admin", "add", unix_user)
    assert added.exit_code == 0 and f"{unix_user} is an admin" in added.output
    assert invoke_main("admin", "list").stdout.split() == sorted([unix_user, "root"])
    _writable_by_all(qrun_home)
    assert _as(unix_user, "cap-priority", "root", "3", home=qrun_home).returncode == 0
    assert _as(unix_user, "admin", "remove", "root", home=qrun_home).returncode == 0
    assert admins.admin_names(db) == [unix_user] and queue.priority_caps(db) == {"root": 3}
    with pytest.raises(BadInput, match="may change the admins, and root is not one"):
        admins.add_admin(db, "root", by="root")
    with pytest.raises(BadInput, match=f"{unix_user} is the last admin: add another"):
        admins.remove_admin(db, unix_user, by=unix_user)
    assert [(e["user"], e["action"], e["target"]) for e in qrun.audit(db=db)] == [
        ("root", "admin add", f"user {unix_user}"), (unix_user, "cap-priority", "user root"),
        (unix_user, "admin remove", "user root")]


def test_caps_and_admins_for_users_this_machine_does_not_have_are_refused(db):
    for args in (("cap-priority", "qrun-test-nobody", "3"), ("admin", "add", "qrun-test-nobody")):
        _refused(invoke_main(*args), "user 'qrun-test-nobody' does not exist on this machine")
    assert queue.priority_caps(db) == {} and admins.admin_names(db) == ["root"] and qrun.audit(db=db) == []
    assert invoke_main("cap-priority", "qrun-test-nobody", "--clear").exit_code == 0  # clearing needs no user


# ---------------------------------------------------------------- no accidental queues


LOOKING = [("status",), ("status", "--watch"), ("status", "--json"), ("compare",), ("logs", "1"), ("workers",),
           ("du",), ("audit",), ("admin", "list"), ("prune", "--older-than", "1d"), ("cancel", "1"), ("retry", "1")]


@pytest.mark.parametrize("command", LOOKING, ids=" ".join)
def test_a_command_that_only_looks_makes_no_table_in_qrun_home(qrun_home, command):
    _refused(invoke_main(*command), f"QRUN_HOME {qrun_home}: no qrun table there", "`qrun submit` or `qrun run`")
    assert not qrun_home.exists()


def test_waiting_on_jobs_makes_no_table(qrun_home, tmp_path):
    """`submit --wait`'s watching (qrun.wait) finds no table rather than making an empty one."""
    with pytest.raises(BadInput, match="no qrun table there"):
        qrun.wait([1])
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(BadInput, match=f"{empty}: no qrun table in that database"):
        qrun.wait([1], db=str(empty))
    assert not qrun_home.exists() and empty.stat().st_size == 0


@pytest.mark.postgres
def test_a_postgres_database_without_qrun_is_not_made_one_by_looking(postgres_url):
    from sqlalchemy import create_engine

    _refused(invoke_main("--db", postgres_url, "status"), "no qrun table in that database")
    engine = create_engine(postgres_url)
    assert inspect(engine).get_table_names() == []
    engine.dispose()


def test_a_db_in_a_directory_that_does_not_exist_is_refused_even_for_root(tmp_path, qrun_home):
    missing = tmp_path / "no" / "such" / "x.db"
    for url in (str(missing), f"sqlite:///{missing}"):  # a command that would create the table
        _refused(invoke_main("--db", url, "cap-priority", "root", "3"),
                 f"--db {missing}: its directory {missing.parent} does not exist")
    assert not (tmp_path / "no").exists()


def test_an_empty_qrun_home_is_refused_not_taken_for_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("QRUN_HOME", "")
    for command in (("status",), ("cap-priority", "root", "3")):
        _refused(invoke_main(*command), "QRUN_HOME is set but empty")
    assert not (tmp_path / ".qrun").exists()


def test_a_home_that_is_a_file_is_one_line(tmp_path):
    home = tmp_path / "home-file"
    home.write_text("")
    without_qrun_home = {k: v for k, v in os.environ.items() if k not in ("QRUN_HOME", "QRUN_DB")}
    looked = subprocess.run([QRUN, "status"], capture_output=True, text=True, env={**without_qrun_home,
                                                                                    "HOME": str(home)})
    _refused(looked, f"HOME {home} is not a directory")
    # With a QRUN_HOME, `qrun run` still needs HOME (Ray's ~/.ray): it died with NotADirectoryError.
    ran = run_qrun("run", "--until-empty", env={"HOME": str(home), "QRUN_HOME": str(tmp_path / "q")})
    _refused(ran, f"HOME {home} is not a directory")
