"""Every method's artifact, as a team uses it: it loads with the client its users reach for (the code its
model card shows, run as it is) and scores the eval rows as qrun's eval recorded; it carries a model card
with its eval; its files, predictions and logs are the team's (a second real Unix user of the group
reads them, and prunes them); `qrun export` copies it with its card.

One run for the module: a quantize job and its eval for every method of the method table, and the
baseline eval, on a 2-layer model of width 256 (GGUF's K-quants), drained on a CPU worker in this
process (some 30 s on 2 idle cores). QRUN_HOME lies outside pytest's private temporary directory, owned
by a group made for the test, so that its second member can reach it.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from helpers import BIN, drain_here, invoke_main, write_labeled
from qrun.db import queue
from qrun.db.states import Kind
from qrun.workers import artifacts, methods
from qrun.workers.card import FORMAT_TAGS, PLACEHOLDER_PATH

pytestmark = pytest.mark.slow

# One variant of each method (the default GGUF type of 4 bits: a K-quant).
POINTS = {"gptq": {"bits": 4, "group_size": 128}, "rtn": {"method": "rtn", "bits": 4, "group_size": 128},
          "awq": {"method": "awq", "bits": 4, "group_size": 128}, "fp8": {"method": "fp8", "bits": 8},
          "gguf": {"method": "gguf", "bits": 4, "gguf_type": "q4_k_m"}, "bnb-nf4": {"method": "bnb-nf4", "bits": 4}}
ROWS = 8  # the eval rows: write_labeled's eight dialogs
SCORE_TOLERANCE = 0.05  # nats: another client's kernels and dtype move a margin of ~13 by up to ~0.02
CLIENTS = [(name, client) for name, method in methods.METHODS.items() for client in method.clients if client.tested]


def test_every_method_of_the_table_is_run_here():
    assert set(POINTS) == set(methods.METHODS)
    assert {name for name, _ in CLIENTS} == set(methods.METHODS)  # each has a client that its test runs


# ---------------------------------------------------------------- the team and the run


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def team():
    """A group and a second member of it (real Unix accounts, removed after): (group name, gid, user)."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to make a second Unix user")
    tag = secrets.token_hex(3)
    group, user = f"qrun-test-g{tag}", f"qrun-test-u{tag}"
    assert _run("groupadd", group).returncode == 0
    made = _run("useradd", "--no-create-home", "--gid", group, "--shell", "/bin/sh", user)
    try:
        assert made.returncode == 0, made.stderr
        yield group, grp.getgrnam(group).gr_gid, user
    finally:
        _run("userdel", user)
        _run("groupdel", group)


@pytest.fixture(scope="module")
def every_method(team, wide_qwen2):
    """Quantize and evaluate every method once, as the team's second member submitting: {"home", "db",
    "baseline" (eval job id), "data", method: {"quantize", "eval", "path", "predictions"}}."""
    from qrun.db.session import open_database

    _, gid, user = team
    home = Path(tempfile.mkdtemp(prefix="qrun-test-home-", dir="/tmp"))
    os.chown(home, -1, gid)
    home.chmod(0o2775)
    data = home / "dialogs.jsonl"
    write_labeled(data)
    umask = os.umask(0o022)
    os.umask(umask)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QRUN_HOME", str(home))
        patch.delenv("QRUN_DB", raising=False)
        db = open_database()
        try:
            run = _quantize_and_evaluate(db, wide_qwen2, data, user)
            yield run | {"home": home, "db": db, "data": data}
        finally:
            os.umask(umask)  # the in-process worker set the group's umask
            db.dispose()
            shutil.rmtree(home, ignore_errors=True)


def _quantize_and_evaluate(db, model: Path, data: Path, user: str) -> dict:
    specs = []
    for point in POINTS.values():
        method = methods.method_of(point)
        params = dict(point) | methods.requirements(method)
        if method.calibrated:
            params |= {"calib": str(data), "calib_samples": 8, "calib_max_len": 64, "batch_size": 4}
        evaluation = {"data": str(data), "ppl_data": str(data), "mode": "score", "batch_size": ROWS,
                      "variant": methods.label(point), "from_upstream": True} | methods.requirements(method)
        specs += [queue.JobSpec(Kind.QUANTIZE, str(model), params),
                  queue.JobSpec(Kind.EVAL, str(model), evaluation, after=len(specs))]
    # Last: its finish rewrites the cards of every variant already evaluated, with their deltas.
    specs.append(queue.JobSpec(Kind.EVAL, str(model), {"data": str(data), "ppl_data": str(data), "mode": "score",
                                                        "batch_size": ROWS, "variant": "baseline"}))
    ids = queue.submit_jobs(db, specs, user=user)
    outcomes = drain_here(db)
    failed = {i: queue.get_job(db, i).error for i in ids if outcomes.get(i) != "succeeded"}
    assert not failed, failed
    run = {"baseline": ids[-1]}
    for index, name in enumerate(POINTS):
        quantize_id, eval_id = ids[2 * index], ids[2 * index + 1]
        (model_artifact,) = queue.artifacts_of(db, [quantize_id])[quantize_id]
        (predictions,) = queue.artifacts_of(db, [eval_id])[eval_id]
        run[name] = {"quantize": quantize_id, "eval": eval_id, "path": Path(model_artifact.path),
                     "predictions": Path(predictions.path), "sha256": model_artifact.sha256}
    return run


# ---------------------------------------------------------------- loading, as users load it


def load_with(client: methods.Client, path: Path):
    """Run the client's code from the model card, as a user pastes it; (model, tokenizer)."""
    gguf = next((p.name for p in path.glob("*.gguf")), "model.gguf")
    scope: dict = {"path": str(path)}
    exec(client.code.format(gguf_file=gguf), scope)  # noqa: S102 -- the card's own code, run as written
    return scope["model"], scope["tokenizer"]


def recorded_rows(predictions: Path) -> list[dict]:
    return [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("method, client", CLIENTS, ids=[f"{m}-{c.name}" for m, c in CLIENTS])
def test_every_artifact_loads_in_its_users_client_and_scores_as_qrun_recorded(every_method, method, client):
    """The card's code loads the artifact on the CPU; scored as qrun's eval scores (chat prompt, the two
    answers' log-probabilities), each row gets the class qrun recorded, and a margin within
    SCORE_TOLERANCE of the recorded one."""
    from qrun.workers.datasets import load_labeled
    from qrun.workers.evaluate import prompt_ids, score_batch

    run = every_method[method]
    model, tokenizer = load_with(client, run["path"])
    samples = load_labeled(every_method["data"])
    scored = score_batch(model, tokenizer, [prompt_ids(tokenizer, s) for s in samples], str(model.device))
    recorded = {row["id"]: row for row in recorded_rows(run["predictions"])}
    agree = sum(prediction == recorded[s.id]["prediction"] for (prediction, _), s in zip(scored, samples))
    drift = max(abs(margin - recorded[s.id]["score"]) for (_, margin), s in zip(scored, samples))
    print(f"{method} in {client.name}: {len(samples)} rows scored, {agree}/{len(samples)} predictions as "
          f"recorded, largest margin difference {drift:.4f}")
    assert len(samples) == len(recorded) == ROWS
    assert agree == len(samples)
    assert drift <= SCORE_TOLERANCE


# ---------------------------------------------------------------- the model card


def card_of(path: Path) -> tuple[dict, str]:
    """(the YAML metadata, the body) of an artifact's README.md."""
    text = (path / artifacts.CARD).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


@pytest.mark.parametrize("method", list(POINTS))
def test_every_artifact_carries_a_model_card_with_its_eval(every_method, wide_qwen2, method):
    run = every_method[method]
    spec = methods.METHODS[method]
    meta, body = card_of(run["path"])
    assert meta["base_model"] == wide_qwen2.name and meta["library_name"] == "transformers"
    assert {"qrun", "quantized", *FORMAT_TAGS[method]} <= set(meta["tags"])
    assert spec.about in body and f"· {methods.label(POINTS[method])}" in body
    assert str(wide_qwen2.resolve()) in body and "% of the source's" in body
    assert "s quantizing" in body and "CPU:" in body
    for client in spec.clients:
        assert f"### {client.name}" in body and client.code.splitlines()[-1].split("{")[0] in body
    assert f'path = "{PLACEHOLDER_PATH}"' in body or not any(c.code.startswith("from") for c in spec.clients)
    # Rewritten when the baseline's eval finished: each metric with its delta, agreement and flips.
    row = next(line for line in body.splitlines() if line.startswith("| `dialogs.jsonl` | score |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == str(ROWS) and all("(+" in c or "(-" in c for c in cells[3:-3])  # F1 ... perplexity
    assert cells[-3].endswith("%") and cells[-2].isdigit() and cells[-1].isdigit()
    assert f"eval job {run['eval']} against baseline eval job {every_method['baseline']}" in body


@pytest.mark.parametrize("method", list(POINTS))
def test_the_manifest_lists_every_file_but_the_card_and_the_table_covers_the_weights(every_method, method):
    run = every_method[method]
    manifest = artifacts.read_manifest(run["path"])
    assert manifest["method"] == method and manifest["variant"] == methods.label(POINTS[method])
    assert manifest["files"] == artifacts.file_digests(run["path"])  # nothing changed after the manifest
    assert artifacts.CARD not in manifest["files"] and artifacts.MANIFEST not in manifest["files"]
    assert run["sha256"] == artifacts.weights_sha256(run["path"])  # the card's rewrite changed no digest


# ---------------------------------------------------------------- the team's files


def _mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


def team_files(every_method, method: str) -> list[Path]:
    """A method's artifact (its directory and files), its predictions, and both jobs' logs."""
    run = every_method[method]
    logs = every_method["home"] / "logs"
    made = [run["path"], *run["path"].rglob("*"), run["predictions"]]
    for job in (run["quantize"], run["eval"]):
        made += [logs / f"job-{job}.log", logs / f"job-{job}.d"]
    return made


@pytest.mark.parametrize("method", list(POINTS))
def test_each_methods_files_are_the_teams_and_a_teammate_reads_them(every_method, team, method):
    """Directories 2775, files 0664, of the home's group (bnb-nf4's weights were 0600); the group's
    second member, a real user, reads every file."""
    _, gid, user = team
    made = team_files(every_method, method)
    modes = {str(p): (_mode(p), p.stat().st_gid) for p in made}
    assert modes == {str(p): ("0o2775" if p.is_dir() else "0o664", gid) for p in made}
    files = [p for p in made if p.is_file()]
    read = subprocess.run(["runuser", "-u", user, "--", "cat", *map(str, files)], capture_output=True, timeout=120)
    assert read.returncode == 0, read.stderr
    assert len(read.stdout) == sum(p.stat().st_size for p in files)


def test_export_copies_an_artifact_with_its_card(every_method, tmp_path):
    run = every_method["fp8"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QRUN_HOME", str(every_method["home"]))
        result = invoke_main("export", str(run["quantize"]), str(tmp_path / "fp8"), "--json")
    assert result.exit_code == 0, result.output
    exported = json.loads(result.stdout)
    target = tmp_path / "fp8"
    assert exported["target"] == str(target) and exported["sha256"] == run["sha256"]
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in run["path"].iterdir())
    assert (target / artifacts.CARD).read_text() == (run["path"] / artifacts.CARD).read_text()
    assert artifacts.file_digests(target) == artifacts.read_manifest(run["path"])["files"]


def test_zz_a_teammate_prunes_the_files_of_the_jobs_they_submitted(every_method, team):
    """Last in the module: it removes what the others read. The jobs are the second member's; their
    files were written by another user (this process), and `qrun prune` run by the member removes
    them all: every directory is group-writable."""
    _, gid, user = team
    made = [p for name in POINTS for p in team_files(every_method, name)]
    home = str(every_method["home"])
    # The member's uid and group; reading root's Python (under /root, 0700) is all it may do beyond them.
    as_member = ["setpriv", f"--reuid={pwd.getpwnam(user).pw_uid}", f"--regid={gid}", "--clear-groups",
                 "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]
    pruned = subprocess.run([*as_member, str(BIN / "qrun"), "prune", "--older-than", "0s", "--yes"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "QRUN_HOME": home, "HOME": home})
    assert pruned.returncode == 0, pruned.stderr
    assert [p for p in made if p.exists()] == []
    assert queue.list_jobs(every_method["db"]) == []
