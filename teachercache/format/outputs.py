"""What teachercache writes to an output path, and the one rule for ``--overwrite`` and ``--resume``.

Every output directory carries a marker, ``.teachercache.json``: the kind of output (``cache``, ``student``
run, ``export``), the options that decide its content and their fingerprint (SHA-256 of their canonical
JSON), and the package version. An exported file (a parquet file has no room beside it) carries the same
JSON under the ``teachercache`` key of its metadata.

``check_output`` decides before a command writes anything:

* a missing path or an empty directory (or one holding only the lock a killed run took): a fresh start, with
  or without ``--resume`` (a run killed before it wrote anything starts again);
* an output of the same kind: ``--resume`` continues it when the options that decide its content are the
  same (else it refuses, listing each changed option, old and new); ``--overwrite`` replaces it, deleting
  only what that kind of output consists of;
* anything else (no marker, another kind, a file where a directory goes, a model directory): refused,
  naming what was found. Nothing a command did not write is deleted.

Outputs written before markers existed (release 0.2) are recognised by their layout: a cache by
``manifest.json`` or ``state/``, a student run by ``metrics.jsonl`` or ``checkpoints/`` (a
training_summary.json alone does not make one: the demo teacher's directory has one); they have no
recorded options, so ``--resume`` of one cannot compare them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

from teachercache.errors import TeachercacheError

MARKER = ".teachercache.json"
"""The marker file of an output directory."""
LOCK = ".teachercache.lock"
"""Held (flock) by the process writing an output directory (a build keeps its own locks under .state/)."""
KINDS = {"cache": "a teachercache cache", "student": "a teachercache training run",
         "export": "a teachercache export"}
LEGACY = {"cache": ("manifest.json", "state"), "student": ("metrics.jsonl", "checkpoints")}
"""Entries by which an output of release 0.2 (no marker) is recognised."""
DOCS = {"cache": "build", "student": "train"}
"""The page (docs/NAME.md) that lists what a resumed output of each kind may change."""


class OutputError(TeachercacheError):
    """An output path is not one this command may write, resume or replace."""


def options_record(options, safe: frozenset[str] = frozenset()) -> dict:
    """The options that decide an output's content, as plain JSON values: a dataclass (nested ones
    flattened to ``group.field``) or a dict, without the names in ``safe`` (those a resumed run may change)."""
    values = asdict(options) if is_dataclass(options) else dict(options)
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = list(value) if isinstance(value, tuple) else value

    walk("", values)
    return {k: v for k, v in sorted(flat.items()) if k not in safe}


def fingerprint(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def marker_json(kind: str, record: dict) -> dict:
    from teachercache import __version__

    return {"kind": kind, "fingerprint": fingerprint(record), "options": record, "version": __version__}


def write_marker(out: Path, kind: str, record: dict) -> None:
    """Write (atomically) the marker of the output directory ``out``."""
    tmp = out / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(marker_json(kind, record), indent=1, default=str))
    os.replace(tmp, out / MARKER)


def read_marker(out: Path) -> dict | None:
    """The marker of the directory ``out``, or None when it has none; OutputError when it is unreadable."""
    path = out / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
        if not isinstance(marker, dict) or marker.get("kind") not in KINDS:
            raise ValueError("no known kind")
        return marker
    except (OSError, ValueError, RecursionError) as e:
        raise OutputError(f"{path}: not a readable teachercache marker ({e}); move the directory aside") from None


def identify(out: Path) -> tuple[str | None, dict | None]:
    """(kind or None, marker or None) of an existing directory: from its marker, else its release-0.2 layout."""
    marker = read_marker(out)
    if marker is not None:
        return marker["kind"], marker
    for kind, names in LEGACY.items():
        if any((out / name).exists() for name in names):
            return kind, None
    return None, None


def describe(out: Path) -> str:
    """What an unknown directory holds, for an error message: a model directory, or its first entries."""
    names = sorted(p.name for p in out.iterdir())
    if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
        what = "a model directory"
    else:
        what = "files teachercache did not write"
    shown = ", ".join(names[:5]) + (f", … ({len(names)} entries)" if len(names) > 5 else "")
    return f"{what} ({shown})"


def changed_options(old: dict, new: dict) -> list[str]:
    """``name: old -> new`` for every option that differs between two records."""
    return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_output(out: Path, kind: str, *, record: dict, resume: bool = False, overwrite: bool = False,
                 flag: str = "--out") -> str:
    """Decide what a command may do with its output directory before it writes anything: ``"new"``,
    ``"resume"`` or ``"overwrite"``; OutputError (naming what was found and the fix) for everything else."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory ({flag}); choose another path")
    if not out.exists() or not any(p.name != LOCK and not p.name.startswith(f"{MARKER}.tmp") for p in out.iterdir()):
        return "new"   # --resume too: a run killed before it wrote anything starts again
    found, marker = identify(out)
    if found != kind:
        what = KINDS[found] if found else describe(out)
        raise OutputError(f"{out}: not {KINDS[kind]} but {what}; teachercache will not write into it, resume it "
                          f"or delete it: choose another {flag}")
    if resume:
        if marker is not None and marker.get("fingerprint") != fingerprint(record):
            changes = changed_options(marker.get("options", {}), record)
            raise OutputError(f"{out}: --resume with other options than the run it continues: "
                              + "; ".join(changes) + ". Run with the recorded options, or start a new "
                              f"{flag} (docs/{DOCS.get(kind, 'build')}.md lists the options a resumed run may change)")
        return "resume"
    if overwrite:
        return "overwrite"
    raise OutputError(f"{out}: already holds {KINDS[kind]}; add --resume to continue it"
                      + (" or --overwrite to replace it" if kind != "student" else "")
                      + f", or choose another {flag}")


def hold_lock(out: Path, what: str):
    """Take the output directory's lock (non-blocking) and return the open file that holds it; OutputError
    when another process holds it. Closing the file releases it."""
    f = open(out / LOCK, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise OutputError(f"{out}: another {what} is writing into this directory (its lock {LOCK} is held); "
                          "wait for it or choose another --out") from None
    return f
