"""`python -m teachercache`: the same command group as the `teachercache` command."""

from teachercache.cli import main

main(prog_name="teachercache")
