"""Every command explains itself: `--help` of each exits 0 with a description, and every option has
help text (as sqlite-utils tests its commands)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from qrun.cli.main import cli


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


COMMANDS = list(_commands(cli))


def test_the_walk_finds_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"submit", "eval", "run", "status", "logs", "cancel", "retry", "workers", "compare", "demo"} <= names


@pytest.mark.parametrize("path, command", [((), cli)] + COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_help_describes_the_command_and_every_option(path, command):
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="qrun")
    assert result.exit_code == 0, result.output
    description = (command.help or "").strip()
    assert description, f"qrun {' '.join(path)} has no description"
    assert description.split()[0] in result.output
    undocumented = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not undocumented, f"qrun {' '.join(path)}: options without help text: {undocumented}"
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.opts[-1] in result.output or param.opts[0] in result.output
