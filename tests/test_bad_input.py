"""Bad input, option by option and file by file: each is refused with one line that names the input
and the fix, exit code 2, no traceback, and the job table exactly as it was.

The bulk runs `cli.main.main` (what the console script runs, error handling included) inside click's
CliRunner; a few run the real console script, among them the unreadable-file cases, which need a
process without root's power to read anything: see `helpers.without_dac`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import QRUN, invoke_main, run_qrun, without_dac

pytestmark = pytest.mark.reliability


@dataclass
class Outcome:
    exit_code: int
    output: str  # stdout and stderr together, as a user sees them


def invoke(*args: str) -> Outcome:
    result = invoke_main(*args)
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


def safetensors_bytes(header: dict | None = None, data: bytes = b"\0" * 4) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the JSON header, the data.
    By default one float32 tensor, whole: what submit's header check accepts."""
    header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}} if header is None else header
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.fixture
def model(tmp_path, tiny_qwen2) -> Path:
    """A model directory that passes every check: tiny_qwen2's config and tokenizer, and a whole (tiny)
    safetensors file."""
    out = tmp_path / "model"
    out.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_qwen2 / name, out / name)
    (out / "model.safetensors").write_bytes(safetensors_bytes())
    return out


def variant(model: Path, name: str, *, config: dict | None = None, weights: str | None = "model.safetensors",
            config_text: str | None = None) -> Path:
    """A copy of `model` with its config changed or replaced, and a weights file of the given name."""
    out = model.parent / name
    out.mkdir()
    base = json.loads((model / "config.json").read_text())
    text = config_text if config_text is not None else json.dumps({**base, **(config or {})})
    (out / "config.json").write_text(text)
    shutil.copy(model / "tokenizer.json", out / "tokenizer.json")
    if weights:
        (out / weights).write_bytes(safetensors_bytes() if weights.endswith(".safetensors") else b"")
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
    line = assert_refused(invoke("submit", "--model", str(model), "--bits", "4", "--group-size", "256"),
                          "--group-size 256", "hidden size 128")
    assert "pick a divisor" in line
    assert table_snapshot(table) == before


@pytest.mark.parametrize("group", ["8", "2", "48"])
def test_group_size_gptqmodel_cannot_pack(table, model, group):
    """GPTQModel quantizes with any group size but packs only these: an 8 failed at the end of the job."""
    before = table_snapshot(table)
    assert_refused(invoke("submit", "--model", str(model), "--bits", "4", "--group-size", group),
                   f"--group-size {group}", "not supported by GPTQModel", "-1, 16, 32, 64, 128, 256, 512, 1024")
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
    (("--data", "{good}", "--batch-size", "0"), ("--batch-size 0",)),  # as `qrun eval` spells it
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
    (("--lease", "0.5"), ("--lease 0.5", "between 1 and 86400 seconds")),
    (("--lease", "nan"), ("--lease nan", "between 1 and 86400 seconds")),
    (("--lease", "inf"), ("--lease inf", "between 1 and 86400 seconds")),
    (("--cpu-workers", "0"), ("--cpu-workers 0", "between 1 and 1024")),
    (("--cpu-workers", "99999999999999999999"), ("--cpu-workers 99999999999999999999", "between 1 and 1024")),
    (("--serve", "--until-empty"), ("--until-empty and --serve", "give one")),
    (("--gpus", "a,b"), ("--gpus 'a,b'", "like 0,1")),
    (("--gpus", "0,0"), ("--gpus '0,0'", "distinct")),
    (("--gpus", "0,1"), ("--gpus 0,1", "CUDA_VISIBLE_DEVICES='5' lets this shell see GPU 0")),
])
def test_run_options(table, args, names, monkeypatch):
    """Refused before Ray starts or a job is claimed."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # this shell sees one GPU, whatever the machine has
    before = table_snapshot(table)
    assert_refused(invoke("run", *args), *names)
    assert table_snapshot(table) == before


def test_a_ray_address_where_nothing_answers(table):
    """Refused in seconds, naming what is wrong: ray.init alone retries such an address for many
    minutes without a word. The real console script, so that a hang fails the test at its timeout."""
    with socket.socket() as probe:  # a port that nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    before = table_snapshot(table)
    for address, reason in ((f"127.0.0.1:{port}", "connection refused"),
                            ("no-such-host.invalid:6379", "unknown host")):
        result = run_qrun("run", "--until-empty", "--ray-address", address, timeout=120)
        assert_script_refused(result, address, reason, "ray start --head")
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
    line = assert_refused(invoke("cap-priority", "root", "3"), "QRUN_HOME", str(blocker / "qrun"), "set QRUN_HOME")
    assert "Not a directory" in line


# ---------------------------------------------------------------- the real console script, without root's reach


def qrun_limited(*args: str, env: dict | None = None):
    import subprocess

    return subprocess.run([*without_dac(), QRUN, *args], capture_output=True, text=True, timeout=120,
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
    result = qrun_limited("cap-priority", "root", "3", env={"QRUN_HOME": str(home), "QRUN_DB": ""})  # (makes a table)
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


# ---------------------------------------------------------------- malformed inputs, one table
#
# Each case builds one malformed model directory, data file or option from the good ones, and runs
# the real entry point (cli.main.main). Every case must be refused as bad input: exit 2, one line
# naming the input, the table untouched. An exception of any other class reaching the user exits 1
# ("Error: TypeError: ...") and fails the case: that is a bug, not a refusal.


def broken_model(model: Path, name: str, *, config=None, config_bytes: bytes | None = None,
                 files: dict[str, bytes] | None = None) -> Path:
    """A copy of the good `model` directory with config.json changed (merged keys, or raw bytes) and
    files added or replaced."""
    out = model.parent / name
    shutil.copytree(model, out)
    if config is not None:
        base = json.loads((model / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**base, **config}))
    if config_bytes is not None:
        (out / "config.json").write_bytes(config_bytes)
    for file_name, content in (files or {}).items():
        (out / file_name).write_bytes(content)
    return out


def config_case(config=None, *, raw: bytes | None = None, names: tuple[str, ...] = ()):
    """Submit a model whose config.json is changed; the line names config.json and `names`."""
    def build(model: Path, tmp_path: Path):
        out = broken_model(model, "m", config=config, config_bytes=raw)
        return [*SUBMIT, "--model", str(out)], [str(out / "config.json"), *names]
    return build


def weights_case(content: bytes, *names: str, file_name: str = "model.safetensors",
                 extra: dict[str, bytes] | None = None):
    """Submit a model whose weights file `file_name` holds `content`; the line names that file."""
    def build(model: Path, tmp_path: Path):
        out = broken_model(model, "m", files={file_name: content, **(extra or {})})
        return [*SUBMIT, "--model", str(out)], [str(out / file_name), *names]
    return build


def data_case(option: str, content: bytes | str, *names: str, suffix: str = ".jsonl", command=SUBMIT):
    """Submit (or eval) with `option` naming a file that holds `content`; the line names the file."""
    def build(model: Path, tmp_path: Path):
        path = tmp_path / f"data{suffix}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return [*command, "--model", str(model), option, str(path)], [str(path), *names]
    return build


def rows(*items) -> str:
    """JSONL of the given rows (dicts are dumped; strings are taken as the line itself)."""
    return "".join((item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)) + "\n" for item in items)


def options_case(*args: str, names: tuple[str, ...], command=SUBMIT):
    def build(model: Path, tmp_path: Path):
        return [*command, "--model", str(model), *args], list(names)
    return build


def artifact_case(quantize_config: bytes, *names: str):
    """`qrun eval` of a quantized model whose quantize_config.json holds `quantize_config`."""
    def build(model: Path, tmp_path: Path):
        data = tmp_path / "good.jsonl"
        data.write_text(rows(GOOD_ROW))
        out = broken_model(model, "artifact", files={"quantize_config.json": quantize_config})
        return ["eval", "--model", str(out), "--data", str(data)], [str(out / "quantize_config.json"), *names]
    return build


def qwen2_weights(model: Path, *, layers: int | None = None, vocab: int | None = None) -> bytes:
    """A safetensors file whose header names tensors as a Qwen2 checkpoint does: the embedding
    [vocab, hidden] and one tensor per decoder layer; by default as many as model's config.json says."""
    config = json.loads((model / "config.json").read_text())
    vocab = config["vocab_size"] if vocab is None else vocab
    header = {"model.embed_tokens.weight": {"dtype": "BF16", "shape": [vocab, config["hidden_size"]],
                                            "data_offsets": [0, 4]}}
    for i in range(config["num_hidden_layers"] if layers is None else layers):
        header[f"model.layers.{i}.input_layernorm.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    return safetensors_bytes(header)


def shape_case(config: dict, *names: str):
    """Submit a model with Qwen2-named weights whose config.json asks for another shape than they have."""
    def build(model: Path, tmp_path: Path):
        out = broken_model(model, "m", files={"model.safetensors": qwen2_weights(model)}, config=config)
        return [*SUBMIT, "--model", str(out)], [str(out / "config.json"), *names]
    return build


def link_case(name: str, target: str, *names: str, command=SUBMIT):
    """A model directory in which `name` is a symbolic link to `target` (a loop, or nothing)."""
    def build(model: Path, tmp_path: Path):
        out = broken_model(model, "m")
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(target)
        data = tmp_path / "good.jsonl"
        data.write_text(rows(GOOD_ROW))
        extra = ["--data", str(data)] if command == EVAL else []
        return [*command, "--model", str(out), *extra], [f"{out}: {name}", *names]
    return build


def two_link_loop(model: Path, tmp_path: Path):
    """model.safetensors -> shard.safetensors -> model.safetensors."""
    out = broken_model(model, "m")
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").symlink_to("shard.safetensors")
    (out / "shard.safetensors").symlink_to("model.safetensors")
    return [*SUBMIT, "--model", str(out)], [f"{out}: model.safetensors", "symlink loop"]


def looping_model_dir(model: Path, tmp_path: Path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    return [*SUBMIT, "--model", str(loop)], [f"model directory {loop}", "symlink loop"]


def shard_case(index: bytes, *names: str):
    def build(model: Path, tmp_path: Path):
        out = broken_model(model, "m", files={"model.safetensors.index.json": index})
        return [*SUBMIT, "--model", str(out)], [str(out / "model.safetensors.index.json"), *names]
    return build


EVAL = ("eval",)
DEEP = b"[" * 100_000 + b"]" * 100_000  # nested past the JSON parser's recursion limit
LABELED = {"input": "发言人1: 您好，请告诉我验证码。", "label": True}
HUGE_LINE = "发言人1: 喂？" + "a" * 10_000_000  # one 10 MB dialog: the tiny model reads 512 tokens
MALFORMED = {
    # config.json: the wrong shape
    "config-a-list": config_case(raw=b"[1, 2]", names=("must be a JSON object", "found a list")),
    "config-a-string": config_case(raw=b'"Qwen2ForCausalLM"', names=("found a string",)),
    "config-null": config_case(raw=b"null", names=("found null",)),
    "config-a-number": config_case(raw=b"42", names=("found a number",)),
    "config-empty": config_case(raw=b"", names=("not valid JSON",)),
    "config-not-utf8": config_case(raw=b'{"hidden_size": "\xff\xfe"}', names=("not valid JSON",)),
    "config-nested-too-deeply": config_case(raw=DEEP, names=("nested too deeply",)),
    # config.json: sizes that are not positive integers
    "layers-a-string": config_case({"num_hidden_layers": "x"}, names=("num_hidden_layers", '"x"', "positive integer")),
    "hidden-a-fraction": config_case({"hidden_size": 12.5}, names=("hidden_size", "12.5")),
    "hidden-a-whole-float": config_case({"hidden_size": 128.0}, names=("hidden_size", "128.0")),
    "hidden-a-boolean": config_case({"hidden_size": True}, names=("hidden_size", "true")),
    "layers-negative": config_case({"num_hidden_layers": -2}, names=("num_hidden_layers", "-2")),
    "layers-zero": config_case({"num_hidden_layers": 0}, names=("num_hidden_layers", "0")),
    "intermediate-a-numeric-string": config_case({"intermediate_size": "256"}, names=("intermediate_size",)),
    "vocab-null": config_case({"vocab_size": None}, names=("vocab_size", "null")),
    "heads-a-list": config_case({"num_attention_heads": [4]}, names=("num_attention_heads",)),
    "hidden-missing": config_case(raw=json.dumps({"architectures": ["Qwen2ForCausalLM"],
                                                  "num_hidden_layers": 2}).encode(), names=("no hidden_size",)),
    "text-config-a-list": config_case({"text_config": [1]}, names=("'text_config'", "found a list")),
    "context-a-fraction": config_case({"max_position_embeddings": 512.5}, names=("max_position_embeddings",)),
    # config.json against the weights' header: layers and the embedding's rows
    "layers-a-billion": shape_case({"num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000",
                                   "hold 2 decoder layers"),
    "layers-more-than-the-weights": shape_case({"num_hidden_layers": 3}, "num_hidden_layers is 3",
                                               "layers 0 to 1", "fix num_hidden_layers"),
    "vocab-not-the-embedding-rows": lambda model, tmp: shape_case(
        {"vocab_size": json.loads((model / "config.json").read_text())["vocab_size"] + 1},
        "vocab_size is", "model.embed_tokens.weight", "rows")(model, tmp),
    # symbolic links that lead nowhere, named as such
    "weights-a-symlink-loop": link_case("model.safetensors", "model.safetensors", "symlink loop"),
    "config-a-symlink-loop": link_case("config.json", "config.json", "symlink loop"),
    "weights-a-two-link-loop": two_link_loop,
    "weights-link-to-nothing": link_case("model.safetensors", "/nonexistent/blob", "/nonexistent/blob",
                                         "does not exist"),
    "eval-of-a-symlink-loop": link_case("model.safetensors", "model.safetensors", "symlink loop", command=EVAL),
    "model-dir-a-symlink-loop": looping_model_dir,
    # tokenizer files transformers reads as JSON objects
    "tokenizer-json-not-json": weights_case(b'{"version": "1.0", "model": ', "not valid JSON",
                                            file_name="tokenizer.json"),
    "tokenizer-config-a-list": weights_case(b"[1, 2]", "must be a JSON object", "found a list",
                                            file_name="tokenizer_config.json"),
    "tokenizer-config-cut-off": weights_case(b'{"eos_token": ', "not valid JSON", file_name="tokenizer_config.json"),
    # config.json: architectures
    "architectures-a-string": config_case({"architectures": "Qwen2ForCausalLM"},
                                          names=("'architectures' must be a list", '["Qwen2ForCausalLM"]')),
    "architectures-of-numbers": config_case({"architectures": [1]}, names=("'architectures' must be a list",)),
    "architectures-an-object": config_case({"architectures": {"a": 1}}, names=("'architectures' must be a list",)),
    "already-quantized": lambda model, tmp: (
        [*SUBMIT, "--model", str(broken_model(model, "q", config={"quantization_config": {"bits": 4}}))],
        [str(model.parent / "q"), "already quantized", "quantization_config", "qrun eval"]),
    # model.safetensors: empty, cut off, not safetensors
    "weights-0-bytes": weights_case(b"", "0 bytes", "too short"),
    "weights-5-bytes": weights_case(b"\x10\0\0\0\0", "5 bytes", "too short"),
    "weights-header-cut-off": weights_case(safetensors_bytes()[:30], "claims", "the file has 30"),
    "weights-data-cut-off": weights_case(safetensors_bytes()[:-2], "is truncated", "re-download"),
    "weights-header-length-huge": weights_case((2**63).to_bytes(8, "little") + b"{}", "claims"),
    "weights-header-not-json": weights_case((10).to_bytes(8, "little") + b"not json!!", "not JSON"),
    "weights-header-not-utf8": weights_case((4).to_bytes(8, "little") + b"\xff\xfe\xfd\xfc", "not JSON"),
    "weights-header-a-list": weights_case(safetensors_bytes([1, 2]), "a list, not an object"),
    "weights-no-offsets": weights_case(safetensors_bytes({"w": {"dtype": "F32", "shape": [1]}}), "data_offsets"),
    "weights-offsets-backwards": weights_case(
        safetensors_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}), "data_offsets"),
    "weights-no-tensors": weights_case(safetensors_bytes({"__metadata__": {"format": "pt"}}, b""), "no tensors"),
    "weights-pickle-under-a-safetensors-name": weights_case(b"\x80\x04\x95" + b"\0" * 64, "claims"),
    "second-shard-truncated": weights_case(safetensors_bytes()[:-1], "is truncated",
                                           file_name="model-00002-of-00002.safetensors"),
    "shard-index-names-a-missing-shard": shard_case(
        json.dumps({"weight_map": {"w": "model.safetensors", "v": "model-00002.safetensors"}}).encode(),
        "model-00002.safetensors", "incomplete"),
    "shard-index-not-json": shard_case(b"{", "not valid JSON"),
    "shard-index-names-a-path": shard_case(json.dumps({"weight_map": {"w": "../model.safetensors"}}).encode(),
                                           "../model.safetensors"),
    # options
    "priority-above-int64": options_case("--priority", str(2**63), names=("--priority", str(2**63), "out of range")),
    "priority-below-int64": options_case("--priority", str(-(2**63) - 1), names=("--priority", "out of range")),
    "eval-priority-above-int64": options_case("--data", "{good}", "--priority", str(2**64), command=EVAL,
                                              names=("--priority", str(2**64))),
    "max-attempts-huge": options_case("--max-attempts", "1000000", names=("--max-attempts 1000000",)),
    "group-size-8": options_case("--group-size", "8", names=("--group-size 8", "not supported")),
    "damp-nan": options_case("--damp", "nan", names=("--damp nan", "between 0 and 1")),
    "eval-batch-size-negative": options_case("--eval", "{good}", "--eval-batch-size", "-1",
                                             names=("--eval-batch-size -1", "positive")),
    # options that no method of the sweep takes: refused, every one alike
    "gguf-batch-size": options_case("--method", "gguf", "--bits", "4", "--batch-size", "8", command=("submit",),
                                    names=("--batch-size does not apply to --method gguf", "no calibration data")),
    "gguf-calib-samples": options_case("--method", "gguf", "--bits", "4", "--calib-samples", "64", command=("submit",),
                                       names=("--calib-samples does not apply to --method gguf",)),
    "fp8-calib-max-len": options_case("--method", "fp8", "--calib-max-len", "512", command=("submit",),
                                      names=("--calib-max-len does not apply to --method fp8",)),
    "bnb-and-fp8-batch-size": options_case("--method", "bnb-nf4", "--method", "fp8", "--batch-size", "4",
                                           command=("submit",), names=("--batch-size", "--method bnb-nf4, fp8")),
    # eval files: not text
    "eval-binary-garbage": data_case("--eval", bytes(range(256)) * 4, "not UTF-8"),
    "eval-latin1": data_case("--eval", '{"input": "café", "label": true}\n'.encode("latin-1"), "not UTF-8"),
    "eval-nul-bytes": data_case("--eval", b'{"input": "a", "label": true}\n\0\0\0\n', "NUL bytes"),
    "eval-empty": data_case("--eval", b"", "is empty"),
    "eval-is-dev-null": lambda model, tmp: ([*SUBMIT, "--model", str(model), "--eval", "/dev/null"],
                                            ["/dev/null", "is not a file"]),
    # eval files: JSON of the wrong shape
    "eval-array-of-numbers": data_case("--eval", "[1, 2, 3]", ":item 1", "found a number", suffix=".json"),
    "eval-a-string": data_case("--eval", '"just text"', ":line 1", "found a string", suffix=".json"),
    "eval-array-cut-off": data_case("--eval", '[{"input": "x", "label": true},', "not valid JSON", suffix=".json"),
    "eval-empty-array": data_case("--eval", "[]", "no samples", suffix=".json"),
    "eval-object-of-rows": data_case("--eval", json.dumps({"rows": [LABELED]}), ":1:", "input, messages, text"),
    "eval-nested-too-deeply": data_case("--eval", DEEP, ":1:", "nested too deeply"),
    "eval-input-a-number": data_case("--eval", rows({"input": 5, "label": True}), ":1:", "'input' must be a string"),
    "eval-input-an-object": data_case("--eval", rows(LABELED, {"input": {"a": 1}, "label": True}), ":2:", "'input'"),
    "eval-input-lone-surrogate": data_case("--eval", '{"input": "\\ud800", "label": true}\n', ":1:",
                                           "invalid character"),
    "eval-instruction-a-list": data_case("--eval", rows({**LABELED, "instruction": ["x"]}), "'instruction'"),
    "eval-id-an-object": data_case("--eval", rows({**LABELED, "id": {"a": 1}}), ":1:", "'id'"),
    # eval files: labels that are not booleans
    "eval-label-1": data_case("--eval", rows({"input": "x", "label": 1}), ":1:", "'label' must be true or false"),
    "eval-label-null": data_case("--eval", rows({"input": "x", "label": None}), "'label' must be true or false"),
    "eval-label-yes": data_case("--eval", rows({"input": "x", "label": "yes"}), "'label' must be true or false"),
    "eval-output-a-number": data_case("--eval", rows({"input": "x", "output": 5}), ":1:", "'output' must be a string"),
    "eval-output-unparseable": data_case("--eval", rows({"input": "x", "output": "maybe"}), ":1:", "no label"),
    "eval-plain-text": data_case("--eval", "a paragraph\n\nanother\n", ":1:", "no label", suffix=".txt"),
    # samples far longer than the model's context (max_position_embeddings)
    "eval-sample-of-10-mb": data_case("--eval", rows(LABELED, {"input": HUGE_LINE, "label": True}), ":2:",
                                      "a sample of 10,000,", "context of 512 tokens", "shorten"),
    "eval-command-sample-of-10-mb": data_case("--data", rows({"input": HUGE_LINE, "label": False}), ":1:",
                                              "max_position_embeddings", command=EVAL),
    "calib-sample-past-the-context": data_case("--calib", rows(*[LABELED] * 4, {"text": "x" * 20_000}), ":5:",
                                               "20,000 characters", "calibration file"),
    # eval files: chat rows of the wrong shape
    "eval-messages-a-string": data_case("--eval", rows({"messages": "hi"}), ":1:", "'messages' must be a list"),
    "eval-messages-empty": data_case("--eval", rows({"messages": []}), ":1:", "'messages' must be a list"),
    "eval-message-without-role": data_case("--eval", rows({"messages": [{"content": "x"}]}), "'messages'"),
    "eval-answer-a-number": data_case("--eval", rows({"messages": [{"role": "user", "content": "x"},
                                                                   {"role": "assistant", "content": 5}]}),
                                      ":1:", "'messages'"),
    # calibration and perplexity files
    "calib-binary-garbage": data_case("--calib", bytes(range(128, 256)) * 8, "not UTF-8", suffix=".bin"),
    "calib-arrays": data_case("--calib", "[[1, 2], [3]]", ":item 1", "found a list", suffix=".json"),
    "calib-text-a-list": data_case("--calib", rows(*[{"text": ["a"]}] * 4), ":1:", "'text' must be a string"),
    "calib-nul-bytes": data_case("--calib", b"\0" * 64, "NUL bytes", suffix=".txt"),
    "ppl-text-a-number": data_case("--eval-ppl", rows({"text": 3.14}), ":1:", "'text' must be a string"),
    "eval-command-ppl-garbage": data_case("--ppl", bytes(range(256)), "not UTF-8", command=EVAL),
    # a quantized model's own config, read by `qrun eval`
    "quantize-config-not-json": artifact_case(b"{bits: 4", "not valid JSON"),
    "quantize-config-a-list": artifact_case(b"[4]", "integer bits"),
    "quantize-config-bits-a-string": artifact_case(b'{"bits": "4"}', "integer bits"),
    "quantize-config-without-bits": artifact_case(b'{"group_size": 128}', "integer bits"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_every_malformed_input_is_refused_at_submit(table, model, files, tmp_path, case):
    args, names = MALFORMED[case](model, tmp_path)
    args = [a.format(good=files["good"]) for a in args]
    before = table_snapshot(table)
    artifacts = sorted(p.name for p in (table.parent).rglob("*"))
    assert_refused(invoke(*args), *names)
    assert table_snapshot(table) == before
    assert sorted(p.name for p in (table.parent).rglob("*")) == artifacts  # no file created either


def test_every_malformed_case_starts_from_input_that_is_accepted(table, model, files, tmp_path):
    """The cases break one thing each: the unbroken inputs they start from -- the model, the data
    files, the options, a shard index and a quantized artifact's config -- are accepted."""
    good = str(files["good"])
    accepted = invoke(*SUBMIT, "--model", str(model), "--eval", good, "--calib", good, "--eval-ppl", good,
                      "--priority", str(2**63 - 1), "--dry-run")
    assert accepted.exit_code == 0, accepted.output
    sharded = broken_model(model, "sharded", files={
        "model.safetensors.index.json": json.dumps({"weight_map": {"w": "model.safetensors"}}).encode()})
    accepted = invoke(*SUBMIT, "--model", str(sharded), "--dry-run")
    assert accepted.exit_code == 0, accepted.output
    artifact = broken_model(model, "artifact", files={"quantize_config.json": b'{"bits": 4, "group_size": 128}'})
    named = broken_model(model, "qwen2-named", files={"model.safetensors": qwen2_weights(model)})
    accepted = invoke(*SUBMIT, "--model", str(named), "--dry-run")
    assert accepted.exit_code == 0, accepted.output  # layers and vocabulary as config.json says
    long_row = rows({"input": "x" * 16_000, "label": True})  # over the 512-token context, within 8 times it
    for option in ("--eval", "--calib"):
        accepted = invoke(*SUBMIT, "--model", str(model), option, str(write(tmp_path / "long.jsonl", long_row * 4)),
                          "--dry-run")
        assert accepted.exit_code == 0, accepted.output
    accepted = invoke("submit", "--model", str(model), "--method", "gptq", "--method", "fp8", "--bits", "4",
                      "--batch-size", "8", "--calib-samples", "64", "--dry-run")
    assert accepted.exit_code == 0, accepted.output  # GPTQ takes them: fp8 goes without
    for source in (model, artifact):
        accepted = invoke(*EVAL, "--model", str(source), "--data", good, "--ppl", good, "--priority", str(2**63 - 1))
        assert accepted.exit_code == 0, accepted.output


def test_a_utf8_byte_order_mark_is_dropped_not_refused(table, model, tmp_path):
    """Windows editors start UTF-8 files with a BOM; the JSON parser would call line 1 invalid."""
    data = tmp_path / "bom.jsonl"
    data.write_bytes("\ufeff".encode() + rows(*[{**GOOD_ROW, "id": i} for i in range(4)]).encode())
    accepted = invoke(*SUBMIT, "--model", str(model), "--eval", str(data), "--json")
    assert accepted.exit_code == 0, accepted.output
    assert len(json.loads(accepted.output)) == 3  # baseline eval, quantize, its eval


@pytest.mark.parametrize("command", ["submit", "eval"])
@pytest.mark.parametrize("gpus", ["0", "-1", "65"])
def test_gpus_per_job_outside_one_to_sixty_four(table, model, tmp_path, command, gpus):
    before = table_snapshot(table)
    if command == "submit":
        args = (*SUBMIT, "--model", str(model))
    else:
        text = tmp_path / "ppl.txt"
        text.write_text("some text to measure perplexity on, long enough to count.\n")
        args = ("eval", "--model", str(model), "--ppl", str(text))
    line = assert_refused(invoke(*args, "--gpus-per-job", gpus), "--gpus-per-job", gpus)
    assert "must lie between 1 and 64" in line
    assert table_snapshot(table) == before


# ---------------------------------------------------------------- cases found trying qrun from outside (2026-12-06)


def test_an_eval_file_whose_ids_repeat_is_refused(table, model, tmp_path):
    """compare matches a variant's predictions to the baseline's by id: two rows with one id would
    collapse into one and hide a flipped answer."""
    before = table_snapshot(table)
    rows = [{**GOOD_ROW, "id": 1}, {**GOOD_ROW, "id": 2}, {**GOOD_ROW, "label": False, "id": 1}]
    data = write(tmp_path / "dup.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    line = assert_refused(invoke(*SUBMIT, "--model", str(model), "--eval", str(data)), f"{data}:3", "line 1")
    assert "id '1'" in line
    assert table_snapshot(table) == before


def test_a_chat_row_with_only_the_answer_is_refused(table, model, tmp_path):
    before = table_snapshot(table)
    row = {"messages": [{"role": "assistant", "content": '{"is_fraud": true}'}]}
    data = write(tmp_path / "chat.jsonl", json.dumps(row) + "\n")
    for command in ((*SUBMIT, "--model", str(model), "--eval", str(data)),
                    ("eval", "--model", str(model), "--data", str(data))):
        assert_refused(invoke(*command), f"{data}:1", "only assistant turns")
    assert table_snapshot(table) == before


def test_a_model_without_its_tokenizer_is_refused(table, model):
    before = table_snapshot(table)
    bare = variant(model, "no-tokenizer")
    (bare / "tokenizer.json").unlink()
    for command in (SUBMIT, ("eval", "--data", "x.jsonl")):
        assert_refused(invoke(*command, "--model", str(bare)), str(bare), "has no tokenizer")
    assert table_snapshot(table) == before


def test_eval_of_pickle_weights_names_no_option_it_lacks(table, model, files):
    pickled = variant(model, "pickled", weights="pytorch_model.bin")
    line = assert_refused(invoke("eval", "--model", str(pickled), "--data", str(files["good"])), str(pickled))
    assert "convert them to safetensors" in line and "--allow-pickle" not in line


@pytest.mark.parametrize("args, names", [
    (("logs", "99999999999999999999"), ("job id '99999999999999999999'", "between 1 and")),
    (("cancel", "9223372036854775808"), ("job id '9223372036854775808'", "between 1 and")),
    (("status", "--since", "99999999999d"), ("--since '99999999999d'", "before the year 1")),
    (("status", "--since", "0001-01-01"), ("--since '0001-01-01'",)),
    (("prune", "--older-than", "99999999999d"), ("--older-than '99999999999d'", "before the year 1")),
    (("status", "--columns", ""), ("--columns ''", "names no column")),
    (("compare", "--columns", " , "), ("--columns ' , '", "names no column")),
    (("compare", "--plot", ""), ("--plot ''", "give a file name")),
    (("compare", "--plot", "sizes.jpg"), ("--plot sizes.jpg", ".png, .svg or .pdf")),
    (("cap-priority", "", "3"), ("user name ''",)),
    (("cap-priority", "a\nb", "3"), ("user name 'a\\nb'",)),
])
def test_values_out_of_range_are_refused_not_raised(table, args, names):
    """Numbers past what the database or datetime holds, and empty values, are bad input (exit 2), not
    an OverflowError (exit 1)."""
    before = table_snapshot(table)
    assert_refused(invoke(*args), *names)
    assert table_snapshot(table) == before


def test_plot_into_a_directory_is_refused_before_the_table(table, tmp_path):
    line = assert_refused(invoke("compare", "--plot", str(tmp_path)), f"--plot {tmp_path}")
    assert "is a directory" in line


def test_a_repeated_job_id_counts_once(table):
    result = invoke("cancel", "1", "1")
    assert result.exit_code == 0, result.output
    assert "cancelled 1" in result.output


def test_eval_mode_without_eval_data_is_refused(table, model):
    assert_refused(invoke(*SUBMIT, "--model", str(model), "--eval-mode", "generate"), "--eval-mode generate",
                   "add --eval")


@pytest.mark.parametrize("option", ["--model", "--eval", "--calib"])
def test_an_empty_path_says_it_is_empty(table, model, option):
    args = [*SUBMIT, "--model", "" if option == "--model" else str(model)]
    if option != "--model":
        args += [option, ""]
    assert_refused(invoke(*args), "'' is an empty path")


def test_a_bad_memory_cap_stops_qrun_run_before_any_job(table, monkeypatch):
    monkeypatch.setenv("QRUN_JOB_MEMORY_MB", "abc")
    before = table_snapshot(table)
    assert_refused(invoke("run", "--until-empty"), "QRUN_JOB_MEMORY_MB='abc'", "number of MiB")
    assert table_snapshot(table) == before


def test_a_refused_run_leaves_no_empty_run_log(table, monkeypatch, qrun_home):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert_refused(invoke("run", "--gpus", "0,1"), "--gpus 0,1")
    assert_refused(invoke("run", "--ray-address", "127.0.0.1:1"), "127.0.0.1:1")
    assert list((qrun_home / "logs").glob("run-*.log")) == []


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_database_is_refused(qrun_home, model, url):
    assert_refused(invoke("--db", url, *SUBMIT, "--model", str(model)), f"--db {url}", "in-memory")


def test_a_file_that_is_not_a_database_is_refused(tmp_path, qrun_home, files):
    assert_refused(invoke("--db", str(files["good"]), "status"), str(files["good"]), "file is not a database")


@pytest.mark.parametrize("command", [("status",), ("status", "--all"), ("logs", "1"), ("compare",), ("workers",),
                                     ("du",), ("prune", "--older-than", "1d")])
def test_a_command_that_only_looks_makes_no_database_at_a_mistyped_path(tmp_path, qrun_home, command):
    """Else a typo in --db would show an empty queue (and leave a file and its directories behind)."""
    typo = tmp_path / "no" / "such" / "qrun.db"
    assert_refused(invoke("--db", str(typo), *command), f"--db {typo}", "no such database")
    assert not (tmp_path / "no").exists()


def test_a_read_only_database_stays_read_only_and_refuses_writes(table, model):
    """A database its owner made read-only (an archive) is not made writable again by `qrun status`;
    another user's write to it is refused in one line, exit 2."""
    table.chmod(0o444)
    assert invoke("status").exit_code == 0
    assert stat_mode(table) == 0o444
    if os.geteuid() == 0:
        os.chown(table, 65534, 65534)  # someone else's file: root without DAC override may not write it
    before = table_snapshot(table)
    for args in (("cancel", "1"), (*SUBMIT, "--model", str(model))):
        line = assert_script_refused(qrun_limited(*args), "read-only for you")
        assert "--db" in line
    assert table_snapshot(table) == before


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
