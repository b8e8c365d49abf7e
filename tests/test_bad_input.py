"""Bad input, option by option and file by file: each is refused with one line that names the input
and the fix, exit code 2, no traceback, and the job table exactly as it was.

The bulk runs `cli.main.main` (what the console script runs, error handling included) inside click's
CliRunner; a few run the real console script, among them the unreadable-file cases, which need a
process without root's power to read anything: see `_without_dac`.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from qrun.cli.main import main
from conftest import run_qrun

pytestmark = pytest.mark.reliability


class _ConsoleScript:
    """`qrun` as the console script runs it (cli.main.main), in the shape CliRunner.invoke expects."""

    name = "qrun"

    def main(self, args, prog_name=None, **_):
        main(list(args))


@dataclass
class Outcome:
    exit_code: int
    output: str  # stdout and stderr together, as a user sees them


def invoke(*args: str) -> Outcome:
    result = CliRunner().invoke(_ConsoleScript(), list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an escaped exception is a failure in itself: show it whole
    return Outcome(result.exit_code, result.output)


def table_snapshot(db_file: Path) -> tuple:
    """Every row of the job table and its history, to prove a refusal left nothing behind."""
    if not db_file.exists():
        return ()
    with sqlite3.connect(db_file) as conn:
        return tuple(tuple(conn.execute(f"SELECT * FROM {t} ORDER BY id")) for t in ("jobs", "events"))


def assert_refused(outcome: Outcome, *names: str) -> str:
    """Exit 2, one line starting with 'Error:', naming every one of `names`, no traceback."""
    lines = outcome.output.strip().splitlines()
    assert outcome.exit_code == 2, outcome.output
    assert len(lines) == 1, outcome.output
    assert lines[0].startswith("Error: "), outcome.output
    assert "Traceback" not in outcome.output
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


# ---------------------------------------------------------------- inputs to break


@pytest.fixture
def table(db, qrun_home):
    """A job table that already holds a job, so 'unchanged' means something."""
    from qrun.db import queue
    from qrun.db.queue import JobSpec
    from qrun.db.states import Kind

    queue.submit_jobs(db, [JobSpec(kind=Kind.QUANTIZE, model="/models/existing", params={"bits": 4})])
    return qrun_home / "qrun.db"


@pytest.fixture
def model(tmp_path, tiny_qwen2) -> Path:
    """A model directory that passes every check: tiny_qwen2's config and a (never read) weights file."""
    out = tmp_path / "model"
    out.mkdir()
    shutil.copy(tiny_qwen2 / "config.json", out / "config.json")
    (out / "model.safetensors").write_bytes(b"")
    return out


def variant(model: Path, name: str, *, config: dict | None = None, weights: str | None = "model.safetensors",
            config_text: str | None = None) -> Path:
    """A copy of `model` with its config changed or replaced, and a weights file of the given name."""
    out = model.parent / name
    out.mkdir()
    base = json.loads((model / "config.json").read_text())
    text = config_text if config_text is not None else json.dumps({**base, **(config or {})})
    (out / "config.json").write_text(text)
    if weights:
        (out / weights).write_bytes(b"")
    return out


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


GOOD_ROW = {"input": "发言人1: 您好，这里是银行客服，请告诉我验证码。", "label": True}


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    rows = [json.dumps({**GOOD_ROW, "id": i}, ensure_ascii=False) for i in range(6)]
    return {
        "good": write(tmp_path / "good.jsonl", "\n".join(rows) + "\n"),
        "empty": write(tmp_path / "empty.jsonl", ""),
        "blank": write(tmp_path / "blank.txt", "\n\n   \n"),
        "malformed": write(tmp_path / "malformed.jsonl", rows[0] + "\n" + '{"input": "a", "label": tru\n'),
        "not_object": write(tmp_path / "not_object.jsonl", rows[0] + "\n[1, 2]\n"),
        "unlabeled": write(tmp_path / "unlabeled.jsonl",
                           rows[0] + "\n" + json.dumps({"input": "发言人1: 喂？"}, ensure_ascii=False) + "\n"),
        "bad_label": write(tmp_path / "bad_label.jsonl", json.dumps({"input": "x", "label": "maybe"}) + "\n"),
        "no_fields": write(tmp_path / "no_fields.jsonl", json.dumps({"question": "x"}) + "\n"),
        "short": write(tmp_path / "short.jsonl", "\n".join(rows[:2]) + "\n"),
        "binary": tmp_path / "binary.txt",
        "a_dir": tmp_path / "a_dir",
    }


@pytest.fixture(autouse=True)
def _binary_and_dir(files):
    files["binary"].write_bytes(b"\xff\xfe\x00 not utf-8 \xff")
    files["a_dir"].mkdir()


# ---------------------------------------------------------------- the cases

SUBMIT = ("submit", "--bits", "4", "--group-size", "32")


def test_model_directory_missing(table, tmp_path):
    before = table_snapshot(table)
    missing = tmp_path / "no-such-model"
    line = assert_refused(invoke(*SUBMIT, "--model", str(missing)), str(missing))
    assert "does not exist: pass a local model directory" in line
    assert table_snapshot(table) == before


def test_model_path_is_a_file(table, model):
    before = table_snapshot(table)
    line = assert_refused(invoke(*SUBMIT, "--model", str(model / "config.json")), "config.json")
    assert "pass the directory holding config.json" in line
    assert table_snapshot(table) == before


def test_model_directory_without_config(table, tmp_path):
    before = table_snapshot(table)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    line = assert_refused(invoke(*SUBMIT, "--model", str(empty)), str(empty), "config.json")
    assert "Hugging Face model directory" in line
    assert table_snapshot(table) == before


def test_config_that_is_not_json(table, model):
    before = table_snapshot(table)
    broken = variant(model, "broken", config_text="{ not json")
    assert_refused(invoke(*SUBMIT, "--model", str(broken)), str(broken / "config.json"), "not valid JSON")
    assert table_snapshot(table) == before


def test_unsupported_architecture(table, model):
    before = table_snapshot(table)
    gpt2 = variant(model, "gpt2", config={"architectures": ["GPT2LMHeadModel"]})
    line = assert_refused(invoke(*SUBMIT, "--model", str(gpt2)), str(gpt2), "GPT2LMHeadModel")
    assert "use one of" in line and "Qwen2ForCausalLM" in line
    assert table_snapshot(table) == before


def test_model_without_weights(table, model):
    before = table_snapshot(table)
    bare = variant(model, "bare", weights=None)
    assert_refused(invoke(*SUBMIT, "--model", str(bare)), str(bare), "*.safetensors")
    assert table_snapshot(table) == before


def test_pickle_only_weights_refused_without_allow_pickle(table, model):
    before = table_snapshot(table)
    pickled = variant(model, "pickled", weights="pytorch_model.bin")
    line = assert_refused(invoke(*SUBMIT, "--model", str(pickled)), str(pickled), "--allow-pickle")
    assert "convert them to safetensors" in line
    assert table_snapshot(table) == before
    # ...and accepted when the user says they trust it (the flag is recorded on the job).
    accepted = invoke(*SUBMIT, "--model", str(pickled), "--allow-pickle", "--json")
    assert accepted.exit_code == 0, accepted.output
    (job_id,) = json.loads(accepted.output)
    with sqlite3.connect(table) as conn:
        (params,) = conn.execute("SELECT params FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert json.loads(params)["allow_pickle"] is True


def test_remote_code_needs_trust_remote_code(table, model):
    before = table_snapshot(table)
    custom = variant(model, "custom", config={"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}})
    line = assert_refused(invoke(*SUBMIT, "--model", str(custom)), str(custom), "--trust-remote-code")
    assert "auto_map" in line
    assert table_snapshot(table) == before


@pytest.mark.parametrize("bits", ["1", "5", "16"])
def test_bits_outside_the_supported_set(table, model, bits):
    before = table_snapshot(table)
    line = assert_refused(invoke("submit", "--model", str(model), "--bits", bits), f"--bits {bits}")
    assert "2, 3, 4, 8" in line
    assert table_snapshot(table) == before


def test_one_bad_bits_in_a_sweep_adds_no_job(table, model):
    before = table_snapshot(table)
    assert_refused(invoke("submit", "--model", str(model), "--bits", "4", "--bits", "8", "--bits", "6"), "--bits 6")
    assert table_snapshot(table) == before


def test_bits_not_a_number(table, model):
    before = table_snapshot(table)
    assert_refused(invoke("submit", "--model", str(model), "--bits", "four"), "--bits", "four", "--help")
    assert table_snapshot(table) == before


def test_group_size_that_does_not_divide_the_layer_width(table, model):
    before = table_snapshot(table)
    line = assert_refused(invoke("submit", "--model", str(model), "--bits", "4", "--group-size", "48"),
                          "--group-size 48", "hidden size 128")
    assert "pick a divisor" in line
    assert table_snapshot(table) == before


@pytest.mark.parametrize("group", ["0", "-7"])
def test_group_size_not_positive(table, model, group):
    before = table_snapshot(table)
    assert_refused(invoke("submit", "--model", str(model), "--bits", "4", "--group-size", group),
                   f"--group-size {group}", "-1")
    assert table_snapshot(table) == before


@pytest.mark.parametrize("damp", ["0", "1.5"])
def test_damp_outside_zero_one(table, model, damp):
    before = table_snapshot(table)
    assert_refused(invoke(*SUBMIT, "--model", str(model), "--damp", damp), f"--damp {float(damp)}", "0.01")
    assert table_snapshot(table) == before


@pytest.mark.parametrize("option", ["--calib-samples", "--calib-max-len", "--batch-size", "--max-attempts"])
def test_counts_that_must_be_positive(table, model, option):
    before = table_snapshot(table)
    assert_refused(invoke(*SUBMIT, "--model", str(model), option, "0"), f"{option} 0", "positive")
    assert table_snapshot(table) == before


@pytest.mark.parametrize("case, names", [
    ("missing", ("does not exist", "check the path")),
    ("a_dir", ("is not a file", "pass a JSONL, JSON or text file")),
    ("empty", ("is empty", "one JSON object a line")),
    ("blank", ("is empty", "one JSON object a line")),
    ("binary", ("not UTF-8",)),
    ("malformed", (":2:", "not valid JSON", "fix or remove the line")),
    ("not_object", (":line 2", "expected a JSON object")),
    ("no_fields", (":1:", "input, messages, text")),
    ("short", ("2 samples", "fewer than the 4 needed", "--calib-samples")),
])
def test_calibration_file(table, model, files, tmp_path, case, names):
    before = table_snapshot(table)
    path = tmp_path / "no-such-calib.jsonl" if case == "missing" else files[case]
    assert_refused(invoke(*SUBMIT, "--model", str(model), "--calib", str(path)), path.name, *names)
    assert table_snapshot(table) == before


@pytest.mark.parametrize("case, names", [
    ("missing", ("eval file", "does not exist", "check the path")),
    ("empty", ("is empty", "one JSON object a line")),
    ("malformed", (":2:", "not valid JSON")),
    ("unlabeled", (":2:", "no label", "'label': true/false")),
    ("bad_label", (":1:", "'label' must be true or false", "maybe")),
])
def test_eval_file_on_submit(table, model, files, tmp_path, case, names):
    before = table_snapshot(table)
    path = tmp_path / "no-such-eval.jsonl" if case == "missing" else files[case]
    assert_refused(invoke(*SUBMIT, "--model", str(model), "--eval", str(path)), path.name, *names)
    assert table_snapshot(table) == before


@pytest.mark.parametrize("args, names", [
    ((), ("--data", "--ppl")),
    (("--data", "{unlabeled}"), ("unlabeled.jsonl", "no label")),
    (("--ppl", "{empty}"), ("empty.jsonl", "is empty")),
    (("--data", "{good}", "--batch-size", "0"), ("--eval-batch-size 0",)),
    (("--data", "{good}", "--mode", "generate", "--max-new-tokens", "0"), ("--max-new-tokens 0",)),
])
def test_eval_command(table, model, files, args, names):
    before = table_snapshot(table)
    args = tuple(a.format(**{k: str(v) for k, v in files.items()}) for a in args)
    assert_refused(invoke("eval", "--model", str(model), *args), *names)
    assert table_snapshot(table) == before


@pytest.mark.parametrize("command", ["cancel", "retry", "logs"])
def test_unknown_job_id(table, command):
    before = table_snapshot(table)
    line = assert_refused(invoke(command, "999"), "job 999", "qrun status")
    assert "does not exist" in line
    assert table_snapshot(table) == before


@pytest.mark.parametrize("command", ["cancel", "status", "logs"])
def test_job_id_not_a_number(table, command):
    before = table_snapshot(table)
    assert_refused(invoke(command, "abc"), "'abc'", "not a number")
    assert table_snapshot(table) == before


def test_cancel_without_job_ids(table):
    assert_refused(invoke("cancel"), "JOB_IDS", "qrun cancel --help")


@pytest.mark.parametrize("args, names", [
    (("--lease", "0.5"), ("--lease 0.5", "at least 1 second")),
    (("--cpu-workers", "0"), ("--cpu-workers 0", "positive")),
    (("--gpus", "a,b"), ("--gpus 'a,b'", "like 0,1")),
    (("--gpus", "0,0"), ("--gpus '0,0'", "distinct")),
])
def test_run_options(table, args, names):
    """Refused before Ray starts or a job is claimed."""
    before = table_snapshot(table)
    assert_refused(invoke("run", *args), *names)
    assert table_snapshot(table) == before


def test_unknown_command():
    assert_refused(invoke("quantise"), "quantise", "qrun --help")


def test_database_from_a_newer_qrun(table, model):
    with sqlite3.connect(table) as conn:
        conn.execute("UPDATE qrun_meta SET value = '99' WHERE key = 'schema_version'")
    before = table_snapshot(table)
    for args in (("status",), (*SUBMIT, "--model", str(model))):
        line = assert_refused(invoke(*args), str(table), "schema version 99")
        assert "upgrade qrun" in line
    assert table_snapshot(table) == before


def test_database_path_is_a_directory(tmp_path, qrun_home):
    assert_refused(invoke("--db", str(tmp_path), "status"), str(tmp_path), "cannot be opened", "QRUN_DB")


def test_database_url_of_an_unknown_kind(qrun_home):
    assert_refused(invoke("--db", "mongodb://host/db", "status"), "mongodb://host/db", "not usable", "postgresql://")


def test_qrun_home_that_cannot_be_created(tmp_path, monkeypatch):
    """As root, a missing permission stops nothing; a file in the way of the directory does."""
    blocker = write(tmp_path / "a-file", "")
    monkeypatch.setenv("QRUN_HOME", str(blocker / "qrun"))
    line = assert_refused(invoke("status"), "QRUN_HOME", str(blocker / "qrun"), "set QRUN_HOME")
    assert "Not a directory" in line


# ---------------------------------------------------------------- the real console script, without root's reach


def _without_dac() -> list[str]:
    """A command prefix that drops the capabilities that let root read and write anything
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): file modes then apply to the process as to any user."""
    if os.geteuid() != 0:
        return []  # an ordinary user already meets file modes
    if not shutil.which("setpriv"):
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot make a file unreadable")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


def qrun_limited(*args: str, env: dict | None = None):
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "qrun"
    return subprocess.run([*_without_dac(), str(exe), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def assert_script_refused(result, *names: str) -> str:
    return assert_refused(Outcome(result.returncode, result.stdout + result.stderr), *names)


def test_unreadable_model_directory(table, model):
    before = table_snapshot(table)
    model.chmod(0o000)
    try:
        line = assert_script_refused(qrun_limited(*SUBMIT, "--model", str(model)), str(model))
    finally:
        model.chmod(0o755)
    assert "not readable" in line and "permissions" in line
    assert table_snapshot(table) == before


@pytest.mark.parametrize("option", ["--calib", "--eval"])
def test_unreadable_data_file(table, model, files, option):
    before = table_snapshot(table)
    files["good"].chmod(0o000)
    try:
        line = assert_script_refused(qrun_limited(*SUBMIT, "--model", str(model), option, str(files["good"])),
                                     str(files["good"]))
    finally:
        files["good"].chmod(0o644)
    assert "not readable" in line and "permissions" in line
    assert table_snapshot(table) == before


def test_unwritable_qrun_home(tmp_path):
    """Someone else's read-only directory (its owner could chmod it; qrun may not)."""
    home = tmp_path / "readonly-home"
    home.mkdir(mode=0o555)
    if os.geteuid() == 0:
        os.chown(home, 65534, 65534)
    else:
        home = Path("/") / f"qrun-home-{os.getpid()}"  # root's directory, closed to an ordinary user
    result = qrun_limited("status", env={"QRUN_HOME": str(home), "QRUN_DB": ""})
    line = assert_script_refused(result, f"QRUN_HOME {home}", "set QRUN_HOME")
    assert "Permission denied" in line
    assert not home.exists() or list(home.iterdir()) == []


def test_console_script_bad_bits(table, model):
    """The same refusal through the real console script: stderr only, nothing on stdout."""
    before = table_snapshot(table)
    result = run_qrun("submit", "--model", str(model), "--bits", "5")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "Error: --bits 5 is not supported: use one of 2, 3, 4, 8"
    assert table_snapshot(table) == before
