"""The `teachercache` command: a thin click layer over the library.

Each command maps its flags onto one options object and one library call, and prints the result.
Errors the user can cause are TeachercacheError subclasses; the group turns them into one line on
stderr and exit code 1. Commands: ``cache`` (build, inspect and interop commands), ``blackbox``
(generate, stepbystep), ``student`` (train, eval, demo); shared flags in ``options``; ``config``: the
``--config`` files and the config.yaml that build, train and demo save.
"""

from __future__ import annotations

import click

from teachercache import __version__
from teachercache.cli import blackbox, cache, student
from teachercache.errors import TeachercacheError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TeachercacheError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="teachercache")
def main():
    """teachercache: run a teacher once, cache its sparse next-token distributions, distil students
    from the cache alone."""


for _module in (cache, blackbox, student):
    for _command in _module.COMMANDS:
        main.add_command(_command)
