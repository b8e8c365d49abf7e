"""The dashboard's pages and its JSON API, a Starlette application over one opened job table.

Every read goes through qrun's library functions with the table opened once (`create_app(db)`), so the
API's rows are the CLI's rows: /api/status is `qrun status --json` (with `all`, `user`, `state`, `sweep`,
`model`, `since` and `limit` as the command's options), /api/compare is `qrun compare --format json`
(`model`, `data`, `sweep`, `metric`, `max_drop`), /api/workers is `qrun workers --json` (`all`). Only GET
(and HEAD) routes exist: nothing here changes the table.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

import qrun
from qrun.comparison import (BASELINE, CELL_NAMES, LOWER_IS_BETTER, METRICS, check_max_drop, evaluated_rows,
                             group_title, groups, metric_name, missing_texts, row_cells)
from qrun.db.errors import BadInput, JobNotFound
from qrun.db.states import Status
from qrun.plotting import plot_points

HERE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
LOG_TAIL = 200  # lines of a job's log its page shows
# Pages may load only what this server serves: a script or style from elsewhere is refused by the browser too.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                                 b"connect-src 'self'; font-src 'self'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


# ---------------------------------------------------------------- JSON, as the CLI prints it


def _json_default(value):
    """What json cannot write itself: times, as `qrun ... --json` writes them (ISO, UTC, Z)."""
    if isinstance(value, datetime):
        return value.isoformat() + "Z"
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_response(data, status_code: int = 200) -> Response:
    body = json.dumps(data, ensure_ascii=False, default=_json_default)
    return Response(body, status_code, media_type="application/json", headers={"cache-control": "no-store"})


def _problem(status_code: int, message: str) -> Response:
    return json_response({"error": message}, status_code)


# ---------------------------------------------------------------- query parameters


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes", "on")


def _values(request: Request, name: str) -> list[str]:
    """A parameter given once or more (?state=queued&state=running); empty values are no filter."""
    return [v for v in request.query_params.getlist(name) if v.strip()]


def _one(request: Request, name: str) -> str | None:
    value = request.query_params.get(name, "").strip()
    return value or None


def _limit(request: Request) -> int | None:
    text = _one(request, "limit")
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise BadInput(f"limit {text!r} is not a number") from None


def _metric(request: Request) -> str:
    metric = _one(request, "metric") or "f1"
    if metric not in METRICS:
        raise BadInput(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    return metric


def _max_drop(request: Request) -> float | None:
    text = _one(request, "max_drop")
    if text is None:
        return None
    try:
        drop = float(text)
    except ValueError:
        raise BadInput(f"max_drop {text!r} is not a number (0.01 = one point of F1)") from None
    check_max_drop(drop)
    return drop


def status_filters(request: Request) -> dict:
    """qrun.status's keywords from the query, as `qrun status`'s options: all, user, state, sweep, model,
    since, limit."""
    return {"users": _values(request, "user"), "states": _values(request, "state"),
            "sweeps": _values(request, "sweep"), "models": _values(request, "model"),
            "since": _one(request, "since"), "show_all": _flag(request, "all"), "limit": _limit(request)}


def compare_filters(request: Request) -> dict:
    """qrun.compare's keywords from the query: model, data, sweep, metric, max_drop."""
    return {"model": _one(request, "model"), "data": _one(request, "data"), "sweep": _one(request, "sweep"),
            "metric": _metric(request), "max_drop": _max_drop(request)}


# ---------------------------------------------------------------- the comparison chart


def _delta_text(value: float | None) -> str:
    return "" if value is None else f"{value:+.3f}"


def chart_panel(group: list[dict], metric: str, max_drop: float | None) -> dict:
    """What the chart of one comparison group draws: qrun.plotting's points (Pareto front, max-drop band,
    the pick), each with its method for the colour and the texts its hover shows."""
    by_variant = {row["variant"]: row for row in group}
    points = []
    for point in plot_points(group, metric, max_drop):
        row = by_variant[point["variant"]]
        method = "baseline" if point["baseline"] else (row.get("method") or "-")
        points.append({**point, "method": method, "job_id": row.get("job_id"), "size_pct": row.get("size_pct"),
                       "delta": row.get(f"{metric}_delta"), "delta_text": _delta_text(row.get(f"{metric}_delta"))})
    base = next((p for p in points if p["baseline"]), None)
    band = None
    if base is not None and max_drop is not None:
        edge = base["value"] + max_drop if metric in LOWER_IS_BETTER else base["value"] - max_drop
        band = sorted((base["value"], edge))
    methods = list(dict.fromkeys(p["method"] for p in points if not p["baseline"]))
    return {"metric": metric, "metric_name": metric_name(metric), "lower_is_better": metric in LOWER_IS_BETTER,
            "max_drop": max_drop, "band": band, "methods": methods, "points": points}


def _finite(data):
    """NaN and infinities as null: a page's JSON must parse in the browser."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    return data


def group_of(rows: list[dict], model: str | None, data: str | None, mode: str | None) -> list[list[dict]]:
    """The comparison groups of `rows` that the page names: its model, data (none: a perplexity-only
    group) and mode, each where given."""
    return [g for g in groups(rows)
            if (model is None or g[0]["model"] == model) and (g[0]["data"] or None) == data
            and (mode is None or g[0]["mode"] == mode)]


def group_summary(group: list[dict]) -> dict:
    """One line of the comparisons' index."""
    first = group[0]
    evaluated = evaluated_rows(group)
    base = next((r for r in evaluated if r["variant"] == BASELINE), None)
    names = {"model": first["model"], "data": first["data"], "mode": first["mode"]}
    href = "/compare/group?" + urlencode({k: v for k, v in names.items() if v})
    return {"title": group_title(group), "href": href, "model": first["model"], "model_name": Path(first["model"]).name,
            "data": first["data"], "data_name": Path(first["data"]).name if first["data"] else None,
            "ppl_data": first["ppl_data"], "mode": first["mode"], "variants": len(evaluated),
            "missing": len(group) - len(evaluated), "baseline_f1": base["f1"] if base else None}


# ---------------------------------------------------------------- the application


class Dashboard:
    """The routes, bound to one opened job table."""

    def __init__(self, db, table: str = ""):
        self.db = db
        self.table = table

    # ------------------------------------------------------------ reading, off the event loop

    async def read(self, function, *args, **kwargs):
        """function(*args, **kwargs) in a worker thread. The table out of reach (a server restarting, a file
        locked past its timeout) is a 503 with one line, and a page that polls tries again."""
        from qrun.db.session import is_transient_db_error

        try:
            return await run_in_threadpool(function, *args, **kwargs)
        except Exception as exc:
            if isinstance(exc, (BadInput, HTTPException)) or not is_transient_db_error(exc):
                raise
            raise HTTPException(503, f"the job table is out of reach: {_first_line(exc)}") from exc

    def page(self, request: Request, name: str, title: str, **context) -> Response:
        return TEMPLATES.TemplateResponse(request, name, {"title": title, "table": self.table, "page": name,
                                                          **context})

    # ------------------------------------------------------------ the JSON API

    async def api_status(self, request: Request) -> Response:
        return json_response(await self.read(qrun.status, db=self.db, **status_filters(request)))

    async def api_workers(self, request: Request) -> Response:
        return json_response(await self.read(qrun.worker_status, all=_flag(request, "all"), db=self.db))

    async def api_compare(self, request: Request) -> Response:
        warnings: list[str] = []
        rows = await self.read(qrun.compare, warn=warnings.append, db=self.db, **compare_filters(request))
        return json_response(list(rows))

    async def api_sweeps(self, request: Request) -> Response:
        return json_response(await self.read(qrun.sweep_status, db=self.db))

    async def api_job(self, request: Request) -> Response:
        return json_response(await self.read(self.job_view, request.path_params["job_id"]))

    def job_view(self, job_id: int) -> dict:
        """A job's status row and what `qrun logs --tail` shows of it: history, the log's last lines, error."""
        rows = qrun.status([job_id], db=self.db)
        if not rows:
            raise JobNotFound(f"job {job_id} does not exist")
        shown = qrun.logs(job_id, tail=LOG_TAIL, db=self.db)
        return {"job": rows[0], "history": shown.history, "log": shown.log, "log_tail": LOG_TAIL,
                "error": shown.error}

    # ------------------------------------------------------------ the pages

    async def queue_page(self, request: Request) -> Response:
        sweeps = await self.read(qrun.sweep_status, db=self.db)
        users = sorted({user for sweep in sweeps for user in sweep["users"]})
        return self.page(request, "queue.html", "Queue", users=users, sweeps=sweeps,
                         states=[s.value for s in Status])

    async def workers_page(self, request: Request) -> Response:
        return self.page(request, "workers.html", "Workers")

    async def sweeps_page(self, request: Request) -> Response:
        sweeps = await self.read(qrun.sweep_status, db=self.db)
        return self.page(request, "sweeps.html", "Sweeps", sweeps=sweeps, states=[s.value for s in Status])

    async def job_page(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        rows = await self.read(qrun.status, [job_id], db=self.db)
        if not rows:
            raise HTTPException(404, f"job {job_id} does not exist")
        return self.page(request, "job.html", f"Job {job_id}", job_id=job_id)

    async def compare_index(self, request: Request) -> Response:
        warnings: list[str] = []
        rows = await self.read(qrun.compare, warn=warnings.append, db=self.db)
        return self.page(request, "compare_index.html", "Comparisons",
                         groups=[group_summary(g) for g in groups(rows)], warnings=warnings)

    async def compare_page(self, request: Request) -> Response:
        given = compare_filters(request)
        warnings: list[str] = []
        rows = await self.read(qrun.compare, warn=warnings.append, db=self.db, **given)
        chosen = group_of(list(rows), given["model"], given["data"], _one(request, "mode"))
        if not chosen:
            raise HTTPException(404, "no comparison matches: see the list of comparisons")
        metric, max_drop = given["metric"], given["max_drop"]
        shown = [{"title": group_title(g), "summary": group_summary(g), "columns": CELL_NAMES,
                  "rows": [{"cells": row_cells(r), "job_id": r["job_id"], "baseline": r["variant"] == BASELINE,
                            "pick": bool(r.get("smallest_within"))} for r in evaluated_rows(g)],
                  "missing": missing_texts(g), "answer": g[0].get("max_drop_answer"),
                  "chart": _finite(chart_panel(g, metric, max_drop))} for g in chosen]
        return self.page(request, "compare.html", f"Compare {shown[0]['summary']['model_name']}", groups=shown,
                         metric=metric, metrics=METRICS, max_drop=max_drop, query=dict(request.query_params),
                         warnings=warnings)


async def _bad_input(request: Request, exc: BadInput) -> Response:
    """Bad input in a query: one line, as the CLI would say it; an unknown job: not found."""
    status_code = 404 if isinstance(exc, JobNotFound) else 400
    if request.url.path.startswith("/api/"):
        return _problem(status_code, str(exc))
    return Response(f"{exc}\n", status_code, media_type="text/plain")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if request.url.path.startswith("/api/"):
        return _problem(exc.status_code, exc.detail)
    return Response(f"{exc.detail}\n", exc.status_code, media_type="text/plain", headers=exc.headers)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def _bug(request: Request, exc: Exception) -> Response:
    """Anything else is a bug: one line with its type (the server's log has the traceback)."""
    message = f"{type(exc).__name__}: {_first_line(exc)}"
    if request.url.path.startswith("/api/"):
        return _problem(500, message)
    return Response(message + "\n", 500, media_type="text/plain")


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, sending)


def create_app(db, table: str = "") -> Starlette:
    """The dashboard over `db` (an opened qrun.db.session.Database); `table`: how its header names the
    table. GET routes only."""
    from starlette.middleware import Middleware

    view = Dashboard(db, table)
    routes = [
        Route("/", view.queue_page, methods=["GET"]),
        Route("/workers", view.workers_page, methods=["GET"]),
        Route("/sweeps", view.sweeps_page, methods=["GET"]),
        Route("/compare", view.compare_index, methods=["GET"]),
        Route("/compare/group", view.compare_page, methods=["GET"]),
        Route("/jobs/{job_id:int}", view.job_page, methods=["GET"]),
        Route("/api/status", view.api_status, methods=["GET"]),
        Route("/api/workers", view.api_workers, methods=["GET"]),
        Route("/api/compare", view.api_compare, methods=["GET"]),
        Route("/api/sweeps", view.api_sweeps, methods=["GET"]),
        Route("/api/jobs/{job_id:int}", view.api_job, methods=["GET"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    handlers = {BadInput: _bad_input, HTTPException: _http_error, Exception: _bug}
    return Starlette(routes=routes, exception_handlers=handlers, middleware=[Middleware(SecurityHeaders)])
