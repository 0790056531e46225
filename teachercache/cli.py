"""The `teachercache` command: a thin click layer over the library.

Each command maps its flags onto one library call and prints the result. Errors the user can cause are
TeachercacheError subclasses; the group turns them into one line on stderr and exit code 1.
"""

from __future__ import annotations

import json

import click

from . import __version__
from .errors import TeachercacheError


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


@main.command("inspect")
@click.argument("cache", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--sample-batches", default=4, show_default=True,
              help="Record batches per shard re-compressed to split bytes by column.")
def inspect_command(cache, as_json, sample_batches):
    """Show what is in CACHE: totals, bytes per token by column, targets, fingerprints."""
    from .inspect import format_report, inspect_cache

    report = inspect_cache(cache, sample_batches=sample_batches)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@main.command("verify")
@click.argument("cache", type=click.Path(file_okay=False))
def verify_command(cache):
    """Check CACHE: manifest, version, checksums, schemas, counts. Exits 1 on any fault."""
    from .verify import verify_cache

    faults = verify_cache(cache)
    for fault in faults:
        click.echo(f"FAULT {fault}", err=True)
    if faults:
        raise SystemExit(1)
    click.echo(f"{cache}: OK")
