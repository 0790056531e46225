"""Click options read off the library's options dataclasses, and the options several commands share.

Defaults and help texts are written once, in the options dataclass: the docstring under each field is
the help, its default the default. ``field_option(BuildOptions, "batch_size", "--batch-size")`` makes
the click option from them. A flag that fills a nested options object is named ``group__field`` (e.g.
``kd__temperature``); ``split_groups`` sorts a command's keyword arguments back into those groups.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap

import click

from teachercache.runtime import DEVICES, DTYPES


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """The docstrings written under the fields of dataclass ``cls``, whitespace folded."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def field_option(cls, name: str, *decls: str, dest: str | None = None, **kwargs):
    """A click option for field ``name`` of dataclass ``cls``: its default and its docstring as help.

    A bool field that defaults to False becomes a flag; one that defaults to True needs ``--x/--no-x``
    in ``decls``. ``dest`` is the keyword the command receives (default: the field name).
    """
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = spec.default if spec.default is not dataclasses.MISSING else None
    kwargs.setdefault("help", field_docs(cls).get(name))
    if isinstance(default, bool) and not any("/" in d for d in decls):
        kwargs.setdefault("is_flag", True)
    if "required" not in kwargs:
        kwargs.setdefault("default", default)
        kwargs.setdefault("show_default", default not in (None, "", False))
    return click.option(*decls, dest or name, **kwargs)


def split_groups(values: dict) -> tuple[dict, dict[str, dict]]:
    """A command's keyword arguments -> (top-level ones, {group: {field: value}}) by the ``group__`` prefix."""
    top, groups = {}, {}
    for key, value in values.items():
        group, sep, name = key.partition("__")
        if sep:
            groups.setdefault(group, {})[name] = value
        else:
            top[key] = value
    return top, groups


def device_option(cls=None):
    """--device: from field ``device`` of ``cls``, or auto for a command without an options dataclass."""
    if cls is not None:
        return field_option(cls, "device", "--device", type=click.Choice(DEVICES))
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                        help="auto (cuda if available), cuda, cpu.")


def trust_remote_code_option(cls, what: str):
    """--trust-remote-code (off unless given), from field ``trust_remote_code`` of ``cls`` when there is
    one; ``what`` names the model whose repository would run its code."""
    help = f"Let the {what} repository run its own code (off unless given)."
    if cls is not None:
        return field_option(cls, "trust_remote_code", "--trust-remote-code", help=help)
    return click.option("--trust-remote-code", is_flag=True, help=help)


def progress_option(cls):
    """--progress/--no-progress, from field ``progress`` of ``cls``."""
    return field_option(cls, "progress", "--progress/--no-progress", help="Show progress bars.")


def runtime_options(cls, what: str):
    """--device, --trust-remote-code and --progress/--no-progress of a command that loads a model."""
    def decorate(command):
        for option in (progress_option(cls), trust_remote_code_option(cls, what), device_option(cls)):
            command = option(command)
        return command
    return decorate


def dtype_option(cls):
    """--dtype of a teacher, from field ``dtype`` of ``cls``."""
    return field_option(cls, "dtype", "--dtype", type=click.Choice(["auto", *DTYPES]))


def overwrite_option(cls):
    """--overwrite, from field ``overwrite`` of ``cls``."""
    return field_option(cls, "overwrite", "--overwrite")


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and ±inf (which a plain FloatRange lets through)."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)
