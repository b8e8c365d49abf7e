"""`qrun warmup`: build GPTQModel's kernels ahead of time (an admin's step on a new machine)."""

from __future__ import annotations

import click

from qrun.cli.common import stderr_line


@click.command()
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Whose kernels: a GPU's (cuda), a CPU's, or this machine's (auto).")
def warmup(device):
    """Build (or load from the cache) the kernels GPTQModel compiles on first use, so that no job
    pays for it: on a new GPU machine gptq_cuda (~21 s), Marlin fp16/bf16 (~2 min each) and AWQ's; on
    a CPU the AVX-512 int4 kernel (~45 s). Workers build them in the background, holding each job
    back until the kernels it uses are ready; after warmup they only load them."""
    import qrun
    from qrun.workers.warmup import describe

    stderr_line(describe(qrun.warmup(device)))  # an unusable kernel is named there, not an error


COMMANDS = [warmup]
