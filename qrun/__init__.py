"""qrun: a job queue for quantizing a model on a shared GPU server, and a record of what each variant costs.

Installed, the repository's role folders live under this one import package:
`qrun.cli` (parsing and printing), `qrun.db` (the job table and its transitions),
`qrun.runner` (Ray and scheduling), `qrun.workers` (what a job does), `qrun.demo`.
"""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "qrun-quant"  # "qrun" on the public index belongs to another project

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
