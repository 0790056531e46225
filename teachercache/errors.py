"""The project's own exceptions.

Every error a user can cause (a wrong path, a damaged shard, a cache from a newer version) is raised as one
of these, with a message that names the file, the problem and, where there is one, the fix. The CLI turns
them into a one-line message and a non-zero exit code; nothing else in the package catches them.
"""

from __future__ import annotations

import math
import os


class TeachercacheError(Exception):
    """Base class of every error teachercache raises on purpose."""


class CacheError(TeachercacheError):
    """A problem with one file of a cache: ``path`` names it, ``problem`` says what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str | None = None):
        self.path = os.fspath(path)
        self.problem = problem
        self.fix = fix
        message = f"{self.path}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)

    def __reduce__(self):  # pickled whole: a shard prefetched in a worker process raises it in the reader's
        return type(self), (self.path, self.problem, self.fix)

    def naming(self, local: str, shown: str) -> "CacheError":
        """The same error with ``shown`` (a URL) where it names ``local`` (the directory that stands for it)."""
        return type(self)(self.path.replace(local, shown), self.problem.replace(local, shown), self.fix)


class CacheIncompleteError(CacheError):
    """The cache has no manifest (still being built, or killed before it finished)."""


class CacheFormatError(CacheError):
    """A file is readable but does not follow the format: a missing field, a wrong schema, a bad value."""


class CacheLimitError(CacheFormatError):
    """A file declares a size beyond this reader's limits (or beyond what its other fields and files allow), or
    is itself too large or too deeply nested: refused when it is read, before anything is sized from it."""


class CacheVersionError(CacheFormatError):
    """The cache was written in a format version this reader does not know."""


class CacheCorruptError(CacheError):
    """A file's bytes are damaged: checksum mismatch, truncation, or a stream that does not decode."""


class CachePathError(CacheError):
    """A path named inside a manifest points outside the cache directory (or is not a plain path)."""


class StorageError(TeachercacheError):
    """A remote location (an fsspec URL) cannot be reached, listed, read or written: the message names the URL,
    what failed and the fix (a missing protocol package, credentials, an endpoint)."""


class TokenizerLoadError(TeachercacheError):
    """transformers could not load a tokenizer without running code: ``problem`` says why, ``custom_code``
    whether its files name code of their own (an auto_map)."""

    def __init__(self, problem: str, custom_code: bool):
        self.problem = problem
        self.custom_code = custom_code
        super().__init__(problem)


class OptionError(TeachercacheError, ValueError):
    """An option value out of its range (NaN, infinite, negative, zero where it must be positive)."""


def check_number(owner: str, name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False) -> None:
    """Refuse (OptionError naming ``owner``'s field) a value that is not a finite number in [low, high]
    (``low_open``: (low, high]); ``integer`` also refuses non-integers. Shared by every options dataclass."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        span = f"{'(' if low_open else '['}{lo}, {hi}]"
        kind = "a finite integer" if integer else "a finite number"
        raise OptionError(f"{owner}: {name} must be {kind} in {span}, got {value!r}")
