"""``--config FILE.yaml``: a command's options from a YAML file, and ``config.yaml``: the options a run used,
saved beside its output so that ``--config`` of that file runs it again.

Keys are the command's option names: a flag without its dashes, with dashes or underscores
(``seq_len`` or ``seq-len`` for ``--seq-len``, ``target``, ``k``). An option that fills a group of the
options dataclass (the dests ``group__field``: ``data__seq_len``, ``targets__k``, ``kd__ce_weight``) may
also sit in a section named after its group, under its field name or its flag name
(``targets: {kind: topk, k: 64}``, ``kd: {ce_weight: 0.1}``), or under a dotted key (``kd.ce_weight``).
A YAML list stands for a repeated flag (``data: {paths: [a.jsonl, b.jsonl]}``) or, for an option that
takes a comma-separated list, for that list (``hidden_layers: [3, 6]``); ``null`` leaves an option at
its default. Each value then goes through click as if it had been typed (its type, range and callback),
and a flag given on the command line wins over the file: the file fills click's ``default_map``.

An unknown key, a section that is not a mapping or an option given twice is refused, naming the file, the
key and the nearest valid one; a value click refuses names the file and the key beside the flag.

``save_config`` writes the running command's options (every one, defaults included, grouped into their
sections) to ``OUT/config.yaml``, except ``RUN_CONTROL``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import click
import yaml
from click.core import ParameterSource

from teachercache import __version__
from teachercache.format.storage import is_url, open_storage

CONFIG_FILE = "config.yaml"
"""The effective options of a run, beside its output (a cache, a student, a demo directory)."""
RUN_CONTROL = frozenset({"resume", "overwrite", "checkpoints__resume"})
"""Options left out of a saved config.yaml: they say what a run does to an output already there (continue it,
replace it), not what the output is. A re-run from the file must be told to resume or to delete."""
_META = "teachercache.config"
"""ctx.meta key of the loaded file (its path and the key that set each dest)."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers (``hint_layers: 2:4`` stays the text 2:4, not
    the integer 124; text such as ``3e-3`` is converted by click), refusing a key given twice. Its numbers are
    a subset of PyYAML's, so whatever a SafeDumper writes reads back the same."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # << merges: their keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue   # refused later, naming the key
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)"
                                               r"|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?"
                                                 r"|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                                                 r"|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))



class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump with lists in flow style: ``hidden_layers: [14, 28]``."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value,
                                                                             flow_style=True))


@dataclass(frozen=True)
class _Keys:
    """The config keys of one command: top-level key -> dest, and section -> {key -> dest}."""

    flat: dict[str, str]
    sections: dict[str, dict[str, str]]

    def spellings(self) -> list[str]:
        return [*self.flat, *(f"{s}.{k}" for s, keys in self.sections.items() for k in keys)]


@dataclass(frozen=True)
class _Loaded:
    path: str
    keys: dict[str, str]
    """dest -> the key that set it, as written in the file."""


class ConfigCommand(click.Command):
    """A click command with ``--config``: a value from the file that click refuses names the file and key."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.BadParameter as e:
            loaded = ctx.meta.get(_META)
            if (loaded is not None and e.param is not None and e.param.name in loaded.keys
                    and ctx.get_parameter_source(e.param.name) == ParameterSource.DEFAULT_MAP):
                e.message = f"{e.message} (set by {loaded.keys[e.param.name]!r} in {loaded.path})"
            raise


def config_option(sections: str = ""):
    """``--config FILE``: read before the other options (eager) into click's ``default_map``. ``sections``
    names the command's groups for the help text."""
    grouped = f", grouped ones also in sections ({sections})" if sections else ""
    return click.option(
        "--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
        callback=_load,
        help=f"YAML file of options: keys are the option names without dashes (seq_len: 256){grouped}; flags "
             f"given on the command line override it. The options of a run are saved as {CONFIG_FILE} beside "
             "its output.")


def _load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    data = read_config(value)
    values, keys = resolve(data, ctx.command, value)
    ctx.default_map = {**(ctx.default_map or {}), **values}
    ctx.meta[_META] = _Loaded(value, keys)


def read_config(path: str | os.PathLike) -> dict:
    """The mapping a config file holds ({} for an empty file); click.BadParameter naming the file otherwise."""
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{path}: cannot read it ({e})") from None
    except yaml.YAMLError as e:
        raise click.BadParameter(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise click.BadParameter(f"{path}: holds a {type(data).__name__}; give a mapping of option names to values, "
                                 "e.g. 'seq_len: 256'")
    return dict(data)


def command_keys(command: click.Command) -> _Keys:
    """Every key ``command``'s config files may use (module docstring)."""
    flat: dict[str, str] = {}
    sections: dict[str, dict[str, str]] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or not param.expose_value:
            continue
        flags = [_norm(o) for o in param.opts if o.startswith("--")]
        group, sep, field = param.name.partition("__")
        if sep:
            for key in (field, *flags):
                _add(sections.setdefault(group, {}), key, param.name)
        else:
            flags.append(param.name)
        for key in flags:
            _add(flat, key, param.name)
    return _Keys(flat, sections)


def _add(keys: dict[str, str], key: str, dest: str) -> None:
    if keys.setdefault(key, dest) != dest:
        raise RuntimeError(f"config key {key!r} would set both {keys[key]} and {dest}: rename a flag")


def _norm(key: str) -> str:
    return key.lstrip("-").replace("-", "_")


def resolve(data: Mapping, command: click.Command, path: str) -> tuple[dict, dict[str, str]]:
    """(dest -> value for click's default_map, dest -> key as written) of a config file's mapping."""
    keys = command_keys(command)
    params = {p.name: p for p in command.params}
    values: dict = {}
    where: dict[str, str] = {}
    for shown, dest, value in _entries(data, keys, path):
        if dest in where:
            raise click.BadParameter(f"{path}: {shown!r} sets the same option as {where[dest]!r}; give it once")
        where[dest] = shown
        if value is not None:   # null: the option's default
            values[dest] = _value(value, params[dest], shown, path)
    return values, where


def _entries(data: Mapping, keys: _Keys, path: str):
    """(key as shown, dest, value) of every option the file sets."""
    for raw, value in data.items():
        key = _key(raw, path)
        section, dot, field = key.partition(".")
        if dot:
            yield f"{section}.{field}", _in_section(keys, section, field, path), value
        elif key in keys.sections and (isinstance(value, Mapping) or key not in keys.flat):
            if value is None:   # an empty section
                continue
            if not isinstance(value, Mapping):
                example = next(iter(keys.sections[key]))
                raise click.BadParameter(f"{path}: {key!r} is a section: give its options as a mapping, e.g. "
                                         f"'{key}: {{{example}: ...}}'")
            for sub, sub_value in value.items():
                field = _key(sub, path)
                yield f"{key}.{field}", _in_section(keys, key, field, path), sub_value
        elif isinstance(value, Mapping):   # only a section takes a mapping
            if key in keys.flat:
                sections = f"the sections are: {', '.join(sorted(keys.sections))}" if keys.sections else "no sections"
                raise click.BadParameter(f"{path}: {key!r} takes a value, not a mapping ({sections})")
            raise _unknown(key, list(keys.sections), path, f"unknown section {key!r}", "sections")
        elif key in keys.flat:
            yield key, keys.flat[key], value
        else:
            raise _unknown(key, keys.spellings() + list(keys.sections), path)


def _in_section(keys: _Keys, section: str, field: str, path: str) -> str:
    if section not in keys.sections:
        raise _unknown(f"{section}.{field}", keys.spellings(), path)
    if field not in keys.sections[section]:
        raise _unknown(f"{section}.{field}", [f"{section}.{k}" for k in keys.sections[section]], path)
    return keys.sections[section][field]


def _key(raw, path: str) -> str:
    if not isinstance(raw, str):
        raise click.BadParameter(f"{path}: key {raw!r} is not an option name (keys are names such as seq_len; "
                                 "quote a key YAML reads as a number or a boolean)")
    return _norm(raw)


def _unknown(key: str, candidates: list[str], path: str, what: str = "", kind: str = "keys") -> click.BadParameter:
    """The refusal of ``key`` (``what``: the problem, default "unknown key"), with the nearest of ``candidates``
    (the valid ``kind``), or all of them."""
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if near:
        hint = f"did you mean {near[0]!r}?"
    else:
        hint = f"the {kind} are: {', '.join(sorted(set(candidates)))}" if candidates else f"the command has no {kind}"
    return click.BadParameter(f"{path}: {what or f'unknown key {key!r}'}; {hint}")


def _value(value, param: click.Parameter, shown: str, path: str):
    """A YAML value as click's default_map takes it for ``param`` (click converts and checks it later)."""
    if isinstance(value, Mapping):
        raise click.BadParameter(f"{path}: {shown!r} takes a value, not a mapping")
    if isinstance(value, list):
        if any(isinstance(v, (list, Mapping)) for v in value):
            raise click.BadParameter(f"{path}: {shown!r} takes a list of plain values")
        return list(value) if param.multiple else ",".join(str(v) for v in value)
    return [value] if param.multiple else value


def save_config(out: str | os.PathLike) -> Path | None:
    """Write the running command's options to ``out``/config.yaml, atomically (``out`` a URL: one object, and
    None is returned); under torchrun only rank 0 writes (the others return None). Every option but RUN_CONTROL, defaults included, in the command's order,
    grouped options in their sections under their field names."""
    ctx = click.get_current_context()
    if not _rank_zero():
        return None
    values: dict = {}
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or not param.expose_value or param.name in RUN_CONTROL:
            continue
        value = ctx.params[param.name]
        value = list(value) if isinstance(value, tuple) else value
        group, sep, field = param.name.partition("__")
        if sep:
            values.setdefault(group, {})[field] = value
        else:
            values[param.name] = value
    left_out = [_flag(p) for p in ctx.command.params if p.name in RUN_CONTROL]
    header = (f"# teachercache {__version__} {ctx.command.name}: the options of this run. "
              f"`teachercache {ctx.command.name} --config {CONFIG_FILE}` runs it again\n"
              "# (flags given beside --config override these values).\n")
    if left_out:
        header += (f"# Left out: {', '.join(left_out)}: they decide what happens to an output already there;\n"
                   "# give them on the command line.\n")
    text = header + yaml.dump(values, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    if is_url(out):  # a cache at a URL: one object (format.storage)
        open_storage(str(out)).write_bytes(CONFIG_FILE, text.encode("utf-8"))
        return None
    path = Path(out) / CONFIG_FILE
    tmp = path.with_name(f"{CONFIG_FILE}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _flag(param: click.Parameter) -> str:
    """The long flag of ``param``, e.g. --resume."""
    return next(o for o in param.opts if o.startswith("--"))


def _rank_zero() -> bool:
    """Rank 0 of torchrun (its process group, else its RANK variable), or a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
