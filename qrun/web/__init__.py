"""`qrun dashboard`: a read-only web view of the job table -- the queue, the workers, the sweeps, each
comparison with its trade-off chart, each job's history and log -- for the people who share it.

It sits beside the CLI, above the API: every page and every /api/ answer is read through qrun's library
functions (qrun.status, qrun.compare, qrun.worker_status, qrun.logs, ...), so the JSON under /api/ is the
JSON of `qrun status --json`, `qrun compare --format json` and `qrun workers --json`. Its scripts, styles
and chart are served from this package: no page asks anything of another machine.
"""
