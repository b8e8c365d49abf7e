"""The Python API (qrun/api.py) that the commands are a thin layer over: the README's example as written,
the same rows as the commands' JSON, cheap to import; on real SQLite files (Postgres where the db
layer is exercised)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qrun
from helpers import REPO, finish_job, run_qrun, write_labeled
from qrun.db import queue
from qrun.db.errors import BadInput, QrunError
from qrun.db.queue import JobSpec
from qrun.db.states import Kind


def readme_example() -> str:
    """The Python code block of the README's "Python API" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_example_runs_as_written(db, tiny_qwen2, tmp_path):
    """In a directory holding the model and test.jsonl it names: the jobs are added, not run."""
    (tmp_path / "qwen2-1.5b-antifraud").symlink_to(tiny_qwen2)
    write_labeled(tmp_path / "test.jsonl")
    result = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=os.environ)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    sweep = re.fullmatch(r"([0-9a-f]{8}) \[1, 2, 3, 4, 5, 6, 7, 8, 9\]", first).group(1)
    assert "2 quantize w4g128·d0.01" in result.stdout.splitlines()
    jobs = queue.jobs_of_sweep(db, "damp-study")
    assert {j.sweep for j in jobs} == {sweep} and len(jobs) == 9
    assert sorted(j.kind for j in jobs) == ["eval"] * 5 + ["quantize"] * 4


def test_importing_qrun_loads_no_database_layer_and_no_torch():
    probe = ("import sys, qrun; qrun.variant_label({'bits': 4}); "
             "print(sorted(m for m in ('torch', 'transformers', 'gptqmodel', 'ray', 'sqlalchemy', 'click') "
             "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_a_dry_run_through_the_api_imports_no_torch(qrun_home, tiny_qwen2):
    probe = (f"import sys, qrun; s = qrun.submit({str(tiny_qwen2)!r}, bits=[4, 8], dry_run=True); "
             "print(len(s.planned), s.ids, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "2 [] False"


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": "4"}, "--bits '4' must be a whole number or a list of them"),
    ({"bits": [4], "damp": ["0.01"]}, "--damp ['0.01'] must be a number"),
    ({"bits": [4, 6]}, "--bits 6 is not supported"),
    ({"bits": 4, "eval_mode": "guess"}, "--eval-mode 'guess' is not one of score, generate"),
])
def test_the_api_refuses_bad_input_as_the_command_does(qrun_home, tiny_qwen2, kwargs, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        qrun.submit(str(tiny_qwen2), **kwargs)
    assert not (qrun_home / "qrun.db").exists()  # refused before the table was opened


def test_status_rows_are_the_commands_json_rows(db, tiny_qwen2):
    submitted = qrun.submit(str(tiny_qwen2), bits=[4, 8], name="rows")
    rows = qrun.status(sweep="rows")
    assert [r["id"] for r in rows] == submitted.ids
    assert {(r["sweep"], r["sweep_name"]) for r in rows} == {(submitted.sweep, "rows")}
    printed = json.loads(run_qrun("status", "--json", *map(str, submitted.ids), check=True).stdout)
    from qrun.cli.common import _json_default  # the command's own serialisation of the same rows

    assert printed == json.loads(json.dumps(rows, default=_json_default))
    assert qrun.status([submitted.ids[1]]) == rows[1:]


def _finished_eval(db, model: str, variant: str, f1: float, depends_on: int | None = None,
                   sweep: str | None = None) -> int:
    spec = JobSpec(kind=Kind.EVAL, model=model, depends_on=depends_on,
                   params={"data": "/d/test.jsonl", "mode": "score", "variant": variant})
    return finish_job(db, spec, {"f1": f1, "accuracy": f1}, sweep=sweep)


def _finished_quantize(db, model: str, bits: int, sweep: str) -> int:
    spec = JobSpec(kind=Kind.QUANTIZE, model=model, params={"bits": bits, "group_size": 128})
    return finish_job(db, spec, {"quantize_s": 3.0}, sweep=sweep)


def test_compare_gives_rows_a_frame_and_a_sweeps_own_variants(any_db, monkeypatch):
    model = "/models/m"
    _finished_eval(any_db, model, "baseline", 0.9, sweep="aaaaaaaa")
    w4 = _finished_quantize(any_db, model, 4, "bbbbbbbb")
    _finished_eval(any_db, model, "w4g128", 0.8, depends_on=w4, sweep="bbbbbbbb")
    w8 = _finished_quantize(any_db, model, 8, "cccccccc")
    _finished_eval(any_db, model, "w8g128", 0.88, depends_on=w8, sweep="cccccccc")

    rows = qrun.compare(db=any_db)
    assert [(r["variant"], r["f1"]) for r in rows] == [("baseline", 0.9), ("w8g128", 0.88), ("w4g128", 0.8)]
    # A sweep: its own variants, measured against the baseline (added by an earlier sweep).
    swept = qrun.compare(sweep="bbbbbbbb", db=any_db)
    assert [(r["variant"], round(r["f1_delta"], 3) if r["f1_delta"] else None) for r in swept] == [
        ("baseline", None), ("w4g128", -0.1)]
    frame = qrun.compare(as_frame=True, db=any_db)
    assert list(frame["variant"]) == ["baseline", "w8g128", "w4g128"] and frame.loc[2, "quantize_s"] == 3.0
    assert swept.to_frame().shape[0] == 2
    cli = run_qrun("--db", any_db.url, "compare", "--sweep", "bbbbbbbb", "--format", "csv", check=True)
    assert [line.split(",")[4] for line in cli.stdout.splitlines()[1:]] == ["baseline", "w4g128"], cli.stdout

    monkeypatch.setitem(sys.modules, "pandas", None)  # as where pandas is not installed
    with pytest.raises(QrunError, match=r"a DataFrame needs pandas, which is not installed: pip install pandas"):
        qrun.compare(as_frame=True, db=any_db)


def test_wait_returns_final_rows_and_times_out_naming_the_jobs(any_db):
    done = _finished_eval(any_db, "/models/m", "baseline", 0.5)
    (pending,) = queue.submit_jobs(any_db, [JobSpec(kind=Kind.QUANTIZE, model="/models/m", params={"bits": 4})])
    seen = []
    rows = qrun.wait([done], db=any_db, on_finish=seen.append)
    assert [(r["id"], r["status"]) for r in rows] == [(done, "succeeded")] and [r["id"] for r in seen] == [done]
    with pytest.raises(qrun.WaitTimeout, match=rf"jobs {pending} did not finish within 0.3 s: is a `qrun run`"):
        qrun.wait([done, pending], timeout=0.3, poll_s=0.05, db=any_db)


def test_version_and_the_package_name(qrun_home):
    from importlib.metadata import version

    result = run_qrun("--version", check=True)
    assert result.stdout.strip() == f"qrun {version('qrun-quant')}" == f"qrun {qrun.__version__}"
    assert Path(qrun.__file__).parent == REPO / "qrun"


def test_the_readme_lists_every_api_function_with_its_parameters():
    """The README's table of functions says what help(qrun) says: every public function, each with
    the name of every parameter it takes."""
    import inspect

    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| command | function | returns |"):text.index("`db=` takes a URL")]
    rows = {line for line in table.splitlines() if line.startswith("|")}
    functions = {name: getattr(qrun, name) for name in qrun.__all__ if inspect.isfunction(getattr(qrun, name))}
    assert {"submit", "evaluate", "run", "status", "logs", "worker_status", "compare", "prune", "du",
            "priority_caps", "set_priority_cap", "warmup", "run_demo"} <= set(functions)
    for name, function in functions.items():
        row = next((r for r in rows if f"`qrun.{name}(" in r), None)
        assert row is not None, f"the README's API table lacks qrun.{name}"
        listed = row[row.index(f"qrun.{name}("):]
        for parameter in inspect.signature(function).parameters.values():
            shown = f"**{parameter.name}" if parameter.kind is parameter.VAR_KEYWORD else parameter.name
            assert shown in listed, f"the README's qrun.{name} lacks its parameter {parameter.name}"
