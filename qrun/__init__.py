"""qrun: a job queue for quantizing a model on a shared GPU server, and a record of what each variant costs.

The top level is the Python API (qrun/api.py), which the `qrun` command is a thin layer over:

    import qrun
    sweep = qrun.submit("./qwen2-1.5b", bits=[4, 8], eval="test.jsonl")
    qrun.wait(sweep.ids)
    qrun.compare(sweep=sweep.sweep)

Installed, the repository's role folders live under this one import package, each a subpackage of
its name: cli/ (parsing and printing, the client of this library), db/ (the job table and its
transitions), runner/ (Ray and scheduling), workers/ (what a job does), demo/. docs/ARCHITECTURE.md
maps them.
"""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "qrun-quant"  # "qrun" on the public index belongs to another project

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a checkout that was never installed (the GPU machine's copy)
    __version__ = "0+unknown"


def _search_the_checkout() -> None:
    """Installed, setuptools maps each role folder (cli/, db/, ...) to its subpackage. Run from a checkout that was never
    installed (PYTHONPATH=the checkout, as on the GPU machine), the role folders are found the same
    way: the checkout's root joins this package's search path. An installed wheel has no checkout."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "cli" / "main.py").is_file() and str(root) not in __path__:
        __path__.append(str(root))


_search_the_checkout()

# Loaded on first use, so that `import qrun` stays cheap (no SQLAlchemy, never torch). One function per
# command (qrun/api.py); no module of this package may share a name with one of them, or importing the
# module would replace the function on the package.
API = ("submit", "evaluate", "run", "status", "wait", "cancel", "retry", "logs", "follow_logs", "worker_status",
       "sweep_status", "compare", "prune", "du", "priority_caps", "set_priority_cap", "admins", "add_admin",
       "remove_admin", "audit", "doctor", "export", "warmup", "run_demo", "to_frame", "Submission",
       "WaitTimeout")
__all__ = [*API, "variant_label", "variant_key", "__version__"]


def __getattr__(name: str):
    if name in API:
        from qrun import api

        return getattr(api, name)
    if name in ("variant_label", "variant_key"):
        from qrun import variants

        return getattr(variants, name)
    raise AttributeError(f"module 'qrun' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
