"""`qrun dashboard`: the real console script serving a real job table (SQLite, and Postgres for the API),
read by a real browser -- Debian's chromium driven by Playwright -- and by the CLI for comparison.

The table holds jobs in every state (a comparison of three variants of equal size among them, a running job
with a log, a queued one waiting its turn, a worker); the tests change it through the db layer while a page
is open, as a runner would."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import QRUN, ci_requires_postgres, free_port, invoke_main, submit_and_claim, wait_for

WORKER = "node-a:4242:gpu0"
EQUAL_SIZE = ("w4g128·d0.01", "w4g128·d0.05", "w4g128·d0.1")  # one size on disk, F1 a thousandth apart


# ---------------------------------------------------------------- the table


def _finish(db, spec, metrics: dict, **claim) -> int:
    from qrun.db import queue

    job_id = submit_and_claim(db, spec, **claim)
    queue.finish_job(db, job_id, "w", metrics, [])
    return job_id


def _scores(f1: float, size: float) -> dict:
    return {"precision": f1, "recall": f1, "f1": f1, "accuracy": f1, "model_size_bytes": size, "eval_samples": 8}


def build_table(db, tmp_path: Path) -> dict:
    """alice's sweep: a baseline and six variants, each evaluated (four of one size, three of them F1
    0.900/0.899/0.898, a few pixels apart on the chart);
    bob's sweep: a failed job, a cancelled one, a running one (layer 5/12, with a log) and a queued one."""
    from qrun.db import queue
    from qrun.db.states import Kind

    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    data = tmp_path / "dialogs.jsonl"
    data.write_text("")

    def evaluation(depends_on=None):
        params = {"data": str(data), "mode": "score", "variant": "baseline" if depends_on is None else "v",
                  "ppl_data": None} | ({"from_upstream": True} if depends_on else {})
        return queue.JobSpec(kind=Kind.EVAL, model=str(model), params=params, depends_on=depends_on)

    alice = {"user": "alice", "sweep": "a11ce000"}
    ids = {"baseline": _finish(db, evaluation(), _scores(0.91, 3e6), **alice)}
    for variant, params, f1, size in (
            ("w8g128·d0.01", {"method": "gptq", "bits": 8, "damp_percent": 0.01}, 0.91, 1.6e6),
            ("rtn-w8g128", {"method": "rtn", "bits": 8}, 0.905, 1.6e6),
            ("rtn-w4g128", {"method": "rtn", "bits": 4}, 0.70, 1e6),
            (EQUAL_SIZE[0], {"method": "gptq", "bits": 4, "damp_percent": 0.01}, 0.900, 1e6),
            (EQUAL_SIZE[1], {"method": "gptq", "bits": 4, "damp_percent": 0.05}, 0.899, 1e6),
            (EQUAL_SIZE[2], {"method": "gptq", "bits": 4, "damp_percent": 0.1}, 0.898, 1e6)):
        spec = queue.JobSpec(kind=Kind.QUANTIZE, model=str(model), params={**params, "group_size": 128})
        ids[variant] = _finish(db, evaluation(_finish(db, spec, {"quantize_s": 3.5}, **alice)), _scores(f1, size),
                               **alice)
    bob = {"user": "bob", "sweep": "b0b00000", "sweep_name": "bobs-sweep"}
    quantize = [queue.JobSpec(kind=Kind.QUANTIZE, model=str(model), params={"bits": b, "group_size": 128})
                for b in (2, 3, 5, 6)]
    ids["failed"], ids["cancelled"], ids["running"], ids["queued"] = queue.submit_jobs(db, quantize, **bob)
    for name in ("failed", "cancelled"):
        assert queue.claim_job(db, "w", None).id == ids[name]
    queue.fail_job(db, ids["failed"], "w", "CUDA out of memory\nTraceback ...")
    queue.cancel_jobs(db, [ids["cancelled"]], force=True)
    queue.register_worker(db, WORKER, "node-a", "gpu0", "cuda", "0")
    assert queue.claim_job(db, WORKER, "0").id == ids["running"]
    queue.record_progress(db, ids["running"], WORKER, 5, 12, "model.layers.5")
    queue.worker_heartbeat(db, WORKER, job=ids["running"])
    log = tmp_path / "running.log"
    log.write_text("loading the model\nquantizing layer 5\n")
    queue.set_log_path(db, ids["running"], str(log))
    return ids | {"model": model, "data": data, "log": log}


# ---------------------------------------------------------------- the server


class Served:
    """`qrun --db URL dashboard --port N` in its own process, until stop()."""

    def __init__(self, db_url: str, tmp_path: Path):
        self.db_url = db_url
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stderr = tmp_path / f"dashboard-{self.port}.err"
        with self.stderr.open("w") as err:
            self.process = subprocess.Popen([QRUN, "--db", db_url, "dashboard", "--port", str(self.port)],
                                            stdout=subprocess.DEVNULL, stderr=err)
        wait_for(self._answers, 60, "the dashboard to answer")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"qrun dashboard exited {self.process.returncode}: {self.stderr.read_text()}")
        try:
            return self.get("/api/status")[0] == 200
        except OSError:
            return False

    def get(self, path: str, method: str = "GET") -> tuple[int, dict, str]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy: this machine only
        request = urllib.request.Request(self.base + path, method=method)
        try:
            with opener.open(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    def json(self, path: str):
        status, _, body = self.get(path)
        assert status == 200, f"{path}: {status} {body}"
        return json.loads(body)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def table(db, tmp_path):
    return build_table(db, tmp_path)


@pytest.fixture
def served(db, table, tmp_path):
    """A dashboard on this test's own table, which the test may change."""
    server = Served(db.url, tmp_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def unchanged(tmp_path_factory):
    """(dashboard, table) shared by the tests that only read: one table and one server for them all."""
    from qrun.db.session import open_database

    home = tmp_path_factory.mktemp("unchanged")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("QRUN_HOME", str(home / "qrun-home"))
        env.delenv("QRUN_DB", raising=False)
        database = open_database()
        try:
            table = build_table(database, home)
            server = Served(database.url, home)
        finally:
            database.dispose()
        yield server, table
        server.stop()


# ---------------------------------------------------------------- the browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by Playwright (its own browser download is not used)."""
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable = None
    if executable is None:
        why = "chromium (make chromium) and Playwright for Python (pip install playwright) are needed"
        if ci_requires_postgres():  # CI set: a browser test never skips
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable,
                                              args=["--no-sandbox", "--no-proxy-server", "--disable-gpu"])
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser):
    """open_page(server): a fresh page on that dashboard. At the end every request the page made is
    checked: none left the machine (each went to the dashboard's own address), and no script failed."""
    opened: list[tuple] = []

    def open_on(server: Served):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(20_000)
        requests: list[str] = []
        errors: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        opened.append((server, context, requests, errors))
        return page

    yield open_on
    for server, context, requests, errors in opened:
        context.close()
        assert requests, "the page made no request at all"
        elsewhere = [url for url in requests if not url.startswith(server.base + "/") and not url.startswith("data:")]
        assert not elsewhere, f"requests that left the dashboard: {elsewhere}"
        assert not errors, f"script errors: {errors}"


# ---------------------------------------------------------------- the API is the CLI


def _cli_json(db_url: str, *args: str):
    result = invoke_main("--db", db_url, *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _same_as_the_cli(before, served, after, where: str = "") -> None:
    """`served` equals what the CLI printed; where the CLI's own two answers differ (a running job's
    elapsed_s and eta_s, a worker's last_seen_s: the clock moved), the served value lies between them."""
    if isinstance(before, dict) and isinstance(served, dict) and isinstance(after, dict):
        assert list(served) == list(before) == list(after), f"{where}: keys differ"
        for key in before:
            _same_as_the_cli(before[key], served[key], after[key], f"{where}.{key}")
    elif isinstance(before, list) and isinstance(served, list) and isinstance(after, list):
        assert len(served) == len(before) == len(after), f"{where}: lengths differ"
        for n, (b, s, a) in enumerate(zip(before, served, after)):
            _same_as_the_cli(b, s, a, f"{where}[{n}]")
    elif before != after and all(isinstance(v, (int, float)) for v in (before, served, after)):
        assert before <= served <= after, f"{where}: {served} is not between the CLI's {before} and {after}"
    else:
        assert served == before == after, f"{where}: served {served!r}, the CLI printed {before!r}"


# Each command line and the API path that answers the same, on the same table.
SAME_AS = (
    (("status", "--json"), "/api/status"),
    (("status", "--json", "--all"), "/api/status?all=1"),
    (("status", "--json", "--user", "bob", "--state", "queued", "--state", "running"),
     "/api/status?user=bob&state=queued&state=running"),
    (("status", "--json", "--sweep", "bobs-sweep", "--all"), "/api/status?sweep=bobs-sweep&all=1"),
    (("workers", "--json"), "/api/workers"),
    (("workers", "--json", "--all"), "/api/workers?all=1"),
    (("compare", "--format", "json"), "/api/compare"),
    (("compare", "--format", "json", "--max-drop", "0.01", "--metric", "accuracy"),
     "/api/compare?max_drop=0.01&metric=accuracy"),
)


def test_the_api_answers_what_the_cli_prints(any_db, tmp_path):
    build_table(any_db, tmp_path)
    server = Served(any_db.url, tmp_path)
    try:
        for cli_args, path in SAME_AS:
            before = _cli_json(any_db.url, *cli_args)
            served = server.json(path)
            after = _cli_json(any_db.url, *cli_args)
            assert before, f"`qrun {' '.join(cli_args)}` printed nothing to compare with"
            _same_as_the_cli(before, served, after, path)
        status, _, body = server.get("/api/status?state=bogus")
        assert status == 400 and "--state 'bogus' is not one of" in json.loads(body)["error"]
    finally:
        server.stop()


# ---------------------------------------------------------------- the pages, in a browser


def _row_statuses(page) -> dict[int, str]:
    return {int(job): status for job, status in page.eval_on_selector_all(
        "#queue tbody tr", "rows => rows.map(r => [r.dataset.job, r.dataset.status])")}


def test_the_queue_page_shows_every_job_and_follows_a_finish_live(open_page, served, db, table):
    from qrun.db import queue

    page = open_page(served)
    page.goto(served.base + "/")
    page.wait_for_selector(f'#queue tr[data-job="{table["queued"]}"]')
    expected = {row["id"]: row["status"] for row in served.json("/api/status")}
    assert _row_statuses(page) == expected
    assert set(expected.values()) == {"queued", "running", "succeeded", "failed", "cancelled"}
    running, queued = (page.locator(f'#queue tr[data-job="{table[n]}"]') for n in ("running", "queued"))
    assert running.locator("td.progress").inner_text().startswith("layer 5/12 · 41%")
    assert re.fullmatch(r"#1 · .+", queued.locator("td.reason").inner_text())  # its place in line, and why
    failed = page.locator(f'#queue tr[data-job="{table["failed"]}"]')
    assert failed.locator("td.error").inner_text() == "CUDA out of memory"
    headers = page.eval_on_selector_all("#queue thead th", "cells => cells.map(c => c.textContent.trim())")
    assert headers == ["ID", "User", "Model", "Kind", "Params", "Status", "Reason", "Progress", "GPU", "Elapsed",
                       "Sweep", "Prio", "Submitted", "Error"]  # every column of `qrun status`

    page.evaluate("window.stillThisPage = true")
    queue.finish_job(db, table["running"], WORKER, {"quantize_s": 9.0}, [])  # as the worker would
    page.wait_for_selector(f'#queue tr[data-job="{table["running"]}"][data-status="succeeded"]')
    assert page.evaluate("window.stillThisPage") is True  # updated in place, never reloaded

    page.select_option("#f-user", "bob")
    page.wait_for_function("() => [...document.querySelectorAll('#queue tbody tr td:nth-child(2)')]"
                           ".every(td => td.textContent === 'bob')")
    assert set(_row_statuses(page)) == {row["id"] for row in served.json("/api/status?user=bob")}
    assert "user=bob" in page.evaluate("location.search")


def _label_boxes(page) -> dict[str, dict]:
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('svg.plot text.label')]
        .map(t => { const r = t.getBoundingClientRect();
                    return [t.dataset.variant, {x: r.x, y: r.y, w: r.width, h: r.height}]; }))""")


def _overlap(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def test_the_comparison_page_charts_size_against_f1_and_names_each_point(open_page, unchanged):
    import qrun
    from qrun.comparison import groups
    from qrun.plotting import plot_points

    served, _ = unchanged
    page = open_page(served)
    page.goto(served.base + "/compare")
    page.click("#comparisons a")
    page.wait_for_selector("svg.plot .point")
    rows = qrun.compare(db=served.db_url)
    variants = [r["variant"] for r in rows if r["evaluated"]]
    assert page.eval_on_selector_all("table.compare tbody td:first-child", "c => c.map(x => x.textContent)") == variants
    drawn = page.eval_on_selector_all("svg.plot .point", "ps => ps.map(p => p.dataset.variant)")
    assert sorted(drawn) == sorted(p["variant"] for p in plot_points(groups(rows)[0]))

    # equal sizes: one x for the three points, and their labels stacked, none over another
    xs = page.eval_on_selector_all("svg.plot circle.point", "ps => Object.fromEntries(ps.map(p => "
                                   "[p.dataset.variant, p.getAttribute('cx')]))")
    assert len({xs[v] for v in EQUAL_SIZE}) == 1
    boxes = _label_boxes(page)
    assert sorted(boxes) == sorted(drawn)
    clashes = [(a, b) for a in boxes for b in boxes if a < b and _overlap(boxes[a], boxes[b])]
    assert not clashes, f"labels printed over each other: {clashes}"

    for variant in ("w8g128·d0.01", "baseline"):
        page.hover(f'svg.plot .point[data-variant="{variant}"]')
        page.wait_for_selector(".chart .tip.shown")
        assert page.inner_text(".chart .tip").splitlines()[0] == variant
    assert "size on disk (MB)" in page.text_content("svg.plot")
    assert {"gptq", "rtn", "baseline", "Pareto front"} <= set(page.eval_on_selector_all(
        ".legend li", "items => items.map(i => i.textContent.trim())"))

    # with a drop: the band, and a ring on the smallest variant within it
    page.fill("#f-max-drop", "0.01")
    page.click("button[type=submit]")
    page.wait_for_selector("svg.plot rect.band")
    assert page.locator("svg.plot .pick-ring").count() == 1
    assert page.inner_text(".answer").startswith(f"smallest within 0.01 F1 of the baseline (0.910): {EQUAL_SIZE[0]}")


def test_a_job_page_shows_history_parameters_and_log_and_follows_the_job(open_page, served, db, table):
    from qrun.db import queue

    page = open_page(served)
    job = table["running"]
    page.goto(f"{served.base}/jobs/{job}")
    page.wait_for_function("() => document.getElementById('log').textContent.includes('quantizing layer 5')")
    assert page.inner_text("#job-status") == "running"
    assert "queued -> running" in page.inner_text("#history")
    assert "bits\n5" in page.inner_text("#params")
    assert page.locator("#no-metrics").is_visible()

    with table["log"].open("a") as log:
        log.write("saving the model\n")
    artifact = table["model"].parent / "w5g128"
    queue.finish_job(db, job, WORKER, {"quantize_s": 42.5},
                     [queue.ArtifactRecord("model", str(artifact), 1234, "0" * 64, "node-a")])
    page.wait_for_function("() => document.getElementById('job-status').textContent === 'succeeded'")
    assert page.inner_text("#log").splitlines()[-1] == "saving the model"
    assert "quantize_s\n42.5" in page.inner_text("#metrics")
    assert str(artifact) in page.inner_text("#artifacts")
    assert "running -> succeeded" in page.inner_text("#history")


def test_the_workers_and_sweeps_pages(open_page, unchanged):
    from qrun.db import queue
    from qrun.db.session import open_database

    served, table = unchanged
    database = open_database(served.db_url, create=False)
    queue.worker_heartbeat(database, WORKER, job=table["running"])  # a report now: the table may be a while old
    database.dispose()
    page = open_page(served)
    page.goto(served.base + "/workers")
    row = page.locator(f'#workers tr[data-worker="{WORKER}"]')
    row.wait_for()
    cells = row.locator("td").all_inner_texts()
    assert cells[:5] == ["node-a", "gpu0", "gpu 0", f"running job {table['running']}", f"job {table['running']}"]
    assert re.fullmatch(r"\d+s ago", cells[5])

    page.goto(served.base + "/sweeps")
    counts = {sweep: dict(zip(("queued", "running", "succeeded", "failed", "cancelled"), texts)) for sweep, texts in (
        (r.get_attribute("data-sweep"), r.locator("td[data-state]").all_inner_texts())
        for r in page.locator("#sweeps tbody tr").all())}
    assert counts == {"b0b00000": {"queued": "1", "running": "1", "succeeded": "", "failed": "1", "cancelled": "1"},
                      "a11ce000": {"queued": "", "running": "", "succeeded": "13", "failed": "", "cancelled": ""}}
    assert "bobs-sweep" in page.inner_text("#sweeps") and "alice" in page.inner_text("#sweeps")


# ---------------------------------------------------------------- offline, read-only, loopback


PAGES = ("/", "/workers", "/sweeps", "/compare", "/jobs/1")


def test_no_page_or_file_it_serves_names_another_machine(unchanged):
    """Every script, style and font comes from qrun's package: no page or static file names a URL of
    another host (the browser tests also watch every request), and the pages forbid loading any."""
    from qrun.web.app import HERE

    served, _ = unchanged
    texts = {path: served.get(path) for path in PAGES}
    status, _, index = texts["/compare"]
    texts["group"] = served.get(re.search(r'href="(/compare/group\?[^"]+)"', index)[1].replace("&amp;", "&"))
    for path in sorted(p.relative_to(HERE / "static").as_posix() for p in (HERE / "static").iterdir()):
        texts[path] = served.get("/static/" + path)
    for path, (status, headers, body) in texts.items():
        assert status == 200, f"{path}: {status}"
        assert not re.search(r"(?i)\b(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", body), f"{path} names another host"
        for reference in re.findall(r'(?:src|href|action)="([^"]*)"', body):
            assert reference.startswith(("/", "data:", "#")), f"{path} loads {reference}"
    policy = texts["/"][1]["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy


def test_the_dashboard_is_read_only_and_listens_on_loopback_only(unchanged):
    served, _ = unchanged
    for path in PAGES + ("/api/status", "/api/compare", "/static/common.js"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert served.get(path, method)[0] == 405, f"{method} {path}"
    listening = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    here = [local for _, local, _, state, *_ in listening if state == "0A" and int(local.split(":")[1], 16) ==
            served.port]
    assert here == [f"0100007F:{served.port:04X}"]  # 127.0.0.1 (little-endian hex), not 0.0.0.0


def test_a_bad_port_or_host_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        missing = str(tmp_path / "no-table.db")  # were a check skipped, the table's refusal would name --db
        for args, says in (
                (("--port", "http"), "--port 'http' is not a number"),
                (("--port", "0"), "--port 0 is out of range"),
                (("--port", "65536"), "--port 65536 is out of range"),
                (("--port", str(busy)), f"--port {busy}: something already listens there"),
                (("--host", "300.1.2.3"), "--host '300.1.2.3' is not an IP address"),
                (("--host", "192.0.2.1"), "--host 192.0.2.1: not an address of this machine"),
                (("--host", ""), "--host '' is not a host name or address")):
            result = invoke_main("--db", missing, "dashboard", *args)
            lines = result.output.strip().splitlines()
            assert (result.exit_code, len(lines)) == (2, 1), result.output
            assert lines[0].startswith(f"Error: {says}"), lines[0]
    assert not os.path.exists(missing)
